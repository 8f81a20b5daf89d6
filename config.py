"""The training configuration: every field, its default and its meaning, in one place.

    cfg = load_config("config.yaml", ["train.lr=1e-5", "rollout.group_size=4"])
    cfg.validate(world_size=8)      # every value checked before any model loads

A run is the defaults below, then a YAML file, then dotted `key=value` overrides from the command line
(`train.lr=1e-5`, `model.lora_target_modules=[q_proj,v_proj]`). Deliberate choices:
- Unknown keys fail, in the file and on the command line, naming the closest valid keys (difflib): a misspelt
  key never silently trains with the default.
- Values are converted to the field's declared type (`"3e-5"` -> 3e-05 for a float, `true` for a bool, a YAML
  list or `a,b` for a list); a value that does not convert fails with the field, the value and the type.
- `validate` checks every value (field, value, fix) before a model is loaded: a typo fails in a second, not after
  a 60 GB download.
- `save_config` writes the resolved config as YAML that `load_config` reads back unchanged.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from model import ModelConfig

SELLER_KINDS = ("llm", "scripted", "chat")
SCRIPTED_STRATEGIES = ("boulware", "linear", "conceder", "hardliner")  # env.ScriptedSeller.STRATEGIES
STYLES = ("full", "compact", "ladder")
ENGINES = ("hf", "vllm")
SYNC_STRATEGIES = ("adapter", "merged")  # vllm_engine.SYNC_STRATEGIES
SHARDINGS = ("none", "fsdp2")
LOSS_AGGS = ("token", "seq", "dr_grpo")
ADV_SCALES = ("none", "std")


@dataclass
class DataConfig:
    path: str = ""  # AmazonHistoryPrice folder or a JSONL catalogue; "" = $NEGO_DATA, then the local cache
    budget_factor: float = 0.8  # buyer budget = budget_factor * list price (Xia et al.)
    test_size: int = 128  # held-out products, never trained on (the paper's 128)
    split_seed: int = 0  # seed of the stratified train/test split


@dataclass
class RolloutConfig:
    group_size: int = 8  # episodes per product; advantages compare episodes within a product's group
    products_per_step: int = 64  # products per step over all ranks (x group_size = episodes per step)
    max_rounds: int = 6  # rounds per episode (one buyer + one seller reply each)
    buyer_temperature: float = 1.0  # sampling temperature of the trained buyer (also scales the trainer's logits)
    buyer_max_tokens: int = 256  # cap on one buyer reply, in tokens
    style: str = "full"  # prompts: "full" (rules + description) | "compact" | "ladder" (tiny models: both roles name rungs; env.py)
    description_chars: int = 400  # product description truncated to this many characters in prompts
    max_context: int = 8192  # a player whose conversation would exceed this many tokens replies with nothing


@dataclass
class SellerConfig:
    kind: str = "llm"  # "llm" (the frozen base model: same engine, adapter off) | "scripted" | "chat" (HTTP endpoint)
    persona: str = "neutral"  # personas/<name>.txt appended to an LLM seller's system prompt ("" = none)
    temperature: float = 0.7  # an LLM seller's sampling temperature
    max_tokens: int = 256  # cap on one seller reply, in tokens
    strategy: str = "boulware"  # scripted seller: boulware | linear | conceder | hardliner
    jitter: float = 0.0  # scripted seller: random spread of its concession exponent and margin per episode
    url: str = ""  # chat seller: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str = ""  # chat seller: the model name the server serves
    api_key_env: str = "OPENAI_API_KEY"  # chat seller: environment variable holding the API key (if any)


@dataclass
class EngineConfig:
    kind: str = "hf"  # "hf" (the trainer's own model; CPU or GPU) | "vllm" (colocated vLLM, one per rank)
    max_batch_tokens: int = 32768  # hf: rows x (longest prompt + max_tokens) per generation batch
    merged_copies: bool = False  # hf (and the HF seller beside merged vLLM): sample from plain copies (base; base +
    # LoRA merged, refreshed after each update), not through peft's wrappers: a small model's CPU rollouts, 23% less
    gpu_memory_utilization: float = 0.35  # vllm: share of the GPU's memory vLLM may take (the trainer needs the rest)
    max_model_len: int = 8192  # vllm: longest sequence vLLM plans for
    max_num_seqs: int = 256  # vllm: sequences decoded at once
    enforce_eager: bool = False  # vllm: skip CUDA graphs (slower generation, faster start, less memory)
    sync_strategy: str = "adapter"  # vllm: "adapter" (load the LoRA folder; base serves the seller) | "merged"
    quantization: str = ""  # vllm: its own weight quantization, e.g. "bitsandbytes" ("" = the checkpoint's dtype)
    sleep: bool = True  # vllm on GPU: free its memory while the trainer runs (sleep mode level 1)
    tensor_parallel_size: int = 1  # vllm: GPUs per engine (world_size / this engines); >1 splits the weights


@dataclass
class TrainConfig:
    steps: int = 60  # optimisation steps (each: rollouts, then updates)
    lr: float = 3e-5  # AdamW learning rate after warm-up
    warmup_updates: int = 0  # linear learning-rate warm-up over this many optimiser updates
    lr_schedule: str = "constant"  # after warm-up: "constant" | "cosine" (down to lr * min_lr_ratio at the last update)
    min_lr_ratio: float = 0.1  # cosine's final learning rate as a fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA parameters
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    updates_per_batch: int = 1  # optimiser updates per batch of rollouts (the batch is cut into this many parts)
    micro_batch_tokens: int = 16384  # token budget of one trainer forward (rows x longest sequence)
    loss_agg: str = "token"  # "token" (DAPO) | "seq" (GRPO paper) | "dr_grpo" (Dr. GRPO)
    dr_grpo_max_tokens: int = 0  # dr_grpo's constant denominator per sequence; 0 = buyer_max_tokens * max_rounds
    eps_low: float = 0.2  # PPO clip: ratio floor 1 - eps_low
    eps_high: float = 0.28  # PPO clip: ratio ceiling 1 + eps_high (DAPO's clip-higher)
    adv_scale: str = "none"  # "none": A = r - group mean (the paper) | "std": also divide by group std + 1e-4
    kl_coef: float = 0.0  # weight of the k3 KL to the base model (adapter off); 0 = no reference forward at all
    kl_before_last_round: float = 1.0  # the KL's weight on replies before round rollout.max_rounds (that round: 1)
    tis_cap: float = 0.0  # truncated importance sampling: weight min(p_trainer / p_engine, cap); 0 = off
    max_bad_updates: int = 3  # stop after this many consecutive updates skipped for NaN/inf loss or gradients
    sharding: str = "none"  # "none": every rank holds the whole model | "fsdp2": base, LoRA, AdamW sharded over ranks


@dataclass
class EvalConfig:
    episodes_per_product: int = 0  # final held-out evaluation, before and after training; 0 = skip it
    products: int = 0  # test products to evaluate; 0 = the whole test split
    seed: int = 1234  # sampling seed of the evaluation episodes (the same for before and after)
    buyer_temperature: float = 1.0  # the buyer's temperature in evaluation (the paper: 1.0)
    batch_size: int = 64  # episodes played in lockstep per evaluation chunk (eval.evaluate)
    scripted: bool = True  # also evaluate a scripted buyer against the same seller: the ladder teachers
    #                        (env.LadderBuyer) in the ladder style, else OG-Narrator (env.ScriptedBuyer)
    generalisation_episodes: int = 0  # per held-out product: the starting and the trained buyer against sellers
    #                                   never trained against (each scripted strategy; an LLM seller at the
    #                                   temperatures below); 0 = skip
    generalisation_jitter: float = 0.5  # the unseen scripted sellers' spread of exponent and margin per episode
    generalisation_temperatures: list[float] = field(default_factory=list)  # LLM seller temperatures to also try
    best_response_products: int = 16  # train products the best-fixed-schedule search plays (ladder style, scripted)
    crossplay_buyers: list[str] = field(default_factory=list)  # self-play: other buyers' checkpoints (e.g. a
    #                                   single-sided run's step_NNNNNN) added to the final cross-play table


@dataclass
class SelfPlayConfig:
    mode: str = "off"  # "off": only the buyer learns (the paper) | "alternate" | "simultaneous": the seller learns too
    switch_every: int = 5  # alternate: this many steps of the buyer learning, then as many of the seller, ...
    seller_lr: float = 0.0  # the seller adapter's AdamW learning rate; 0 = train.lr (same schedule and warm-up)
    intervention_penalty: float = -1.0  # the seller's reward for an episode the regulation had to overrule it in
    league_latest: float = 1.0  # weights of each group's opponent: the other side as it is now (its adapter)
    league_snapshots: float = 0.0  # one of its saved snapshots, uniformly (the latest while there is none yet)
    league_base: float = 0.0  # the frozen base model (adapter off), which plays both roles
    league_scripted: float = 0.0  # scripted: the seller family / the ladder teachers (ladder style), OG-Narrator
    snapshot_every: int = 10  # steps between snapshots of each side's adapter (kept in memory and in out_dir)
    max_snapshots: int = 4  # snapshots kept per side (the oldest is dropped)


@dataclass
class LogConfig:
    transcripts_per_step: int = 4  # full episodes written to transcripts.jsonl per step (one per product)
    tensorboard: bool = False  # write TensorBoard events to <out_dir>/tb (needs the tensorboard package)
    wandb_project: str = ""  # log to this W&B project ("" = off; needs the wandb package)
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy (model.py): base model, LoRA, QLoRA
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    seller: SellerConfig = field(default_factory=SellerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    selfplay: SelfPlayConfig = field(default_factory=SelfPlayConfig)  # the seller learns back (a second adapter)
    log: LogConfig = field(default_factory=LogConfig)
    out_dir: str = "runs/default"  # run folder: config, metrics, transcripts, checkpoints
    seed: int = 0  # seeds data order, sampling and every rank's RNG (rank r uses seed + r where it differs)
    device: str = "auto"  # "auto" = cuda:<local rank> when CUDA is available, else cpu
    world_size: int = 0  # ranks this config is planned for; 0 = any; another launch size fails at start
    save_every: int = 10  # checkpoint every this many steps (and always at the end); 0 = only at the end
    keep_checkpoints: int = 3  # keep the newest this many checkpoints
    resume: str = "auto"  # "auto" = newest complete checkpoint in out_dir if any | "never" | a checkpoint folder

    def validate(self, world_size: int = 1) -> None:
        """Every value, before anything heavy happens. Raises ConfigError naming the field and the fix."""
        problems = []

        def need(ok: bool, key: str, msg: str):
            if not ok:
                problems.append(f"{key}={_show(_get(self, key))}: {msg}")

        try:
            self.model.validate()
        except ValueError as e:
            problems.append(str(e))
        d, r, s, e, t, ev, lg = self.data, self.rollout, self.seller, self.engine, self.train, self.eval, self.log
        need(d.budget_factor > 0, "data.budget_factor", "must be > 0 (Xia et al. use 0.8)")
        need(d.test_size >= 1, "data.test_size", "must be >= 1 (the paper holds out 128 products)")
        need(r.group_size >= 2, "rollout.group_size", "must be >= 2: an advantage compares episodes of one group (e.g. 8)")
        need(r.products_per_step >= 1, "rollout.products_per_step", "must be >= 1 (e.g. 64)")
        need(r.max_rounds >= 1, "rollout.max_rounds", "must be >= 1 (the paper: 6)")
        need(r.buyer_temperature > 0, "rollout.buyer_temperature",
             "must be > 0: GRPO needs sampled, varied episodes (the paper: 1.0)")
        need(r.buyer_max_tokens >= 1, "rollout.buyer_max_tokens", "must be >= 1 (e.g. 256)")
        need(r.style in STYLES, "rollout.style", f"use one of {STYLES}")
        need(r.description_chars >= 0, "rollout.description_chars", "must be >= 0")
        need(r.max_context > r.buyer_max_tokens, "rollout.max_context", "must exceed rollout.buyer_max_tokens")
        need(s.kind in SELLER_KINDS, "seller.kind", f"use one of {SELLER_KINDS}")
        if s.persona:  # checked for every seller kind: a typo never passes silently
            import env
            need(s.persona in env.list_personas(), "seller.persona",
                 f"unknown persona; use one of {env.list_personas()} or add personas/{s.persona}.txt")
        need(s.temperature >= 0, "seller.temperature", "must be >= 0 (0 = greedy; the paper: 0.7)")
        need(s.max_tokens >= 1, "seller.max_tokens", "must be >= 1")
        if s.kind == "scripted":
            need(s.strategy == "mixed" or all(m in SCRIPTED_STRATEGIES for m in s.strategy.split("+")),
                 "seller.strategy", f"use one of {SCRIPTED_STRATEGIES}, 'mixed' (one of the four per group) or "
                 "several joined by '+' (one of them per group; repeat one to weight it)")
            need(s.jitter >= 0, "seller.jitter", "must be >= 0")
        if s.kind == "chat":
            need(s.url.startswith(("http://", "https://")), "seller.url",
                 "a chat seller needs the server's URL, e.g. http://127.0.0.1:8000/v1")
            need(bool(s.model), "seller.model", "a chat seller needs the served model's name")
        need(e.kind in ENGINES, "engine.kind", f"use one of {ENGINES}")
        need(e.max_batch_tokens >= r.buyer_max_tokens, "engine.max_batch_tokens", "must be >= rollout.buyer_max_tokens")
        need(0 < e.gpu_memory_utilization < 1, "engine.gpu_memory_utilization", "must be in (0, 1), e.g. 0.35")
        need(e.max_model_len >= 1, "engine.max_model_len", "must be >= 1")
        need(e.max_num_seqs >= 1, "engine.max_num_seqs", "must be >= 1")
        need(e.sync_strategy in SYNC_STRATEGIES, "engine.sync_strategy", f"use one of {SYNC_STRATEGIES}")
        if e.kind == "vllm" and e.sync_strategy == "merged":
            need(s.kind != "llm" or t.sharding == "none", "engine.sync_strategy",
                 "a merged engine holds the policy, so the base-model seller is served by the HF engine over the "
                 "trainer's model, which needs train.sharding=none (a model small enough for that); use adapter, "
                 "or a scripted / chat seller")
        if e.kind == "vllm" and e.sync_strategy == "adapter":
            experts = [p for p in self.model.lora_target_parameters if "experts" in p]
            both = {"gate_up_proj", "down_proj"} <= {p.rsplit(".", 1)[-1] for p in experts}
            need(not experts or both, "model.lora_target_parameters",
                 "vLLM converts peft's fused expert LoRA only when both mlp.experts.gate_up_proj and "
                 "mlp.experts.down_proj are adapted: target both, or neither, or use engine.sync_strategy=merged")
        need(not e.merged_copies or t.sharding == "none", "engine.merged_copies",
             "plain copies of the whole model are for an unsharded (small) model: set it false with train.sharding")
        need(e.tensor_parallel_size >= 1, "engine.tensor_parallel_size", "must be >= 1 (1 = one engine per rank)")
        if e.tensor_parallel_size > 1:
            need(e.kind == "vllm", "engine.tensor_parallel_size",
                 "tensor parallelism needs engine.kind=vllm; use 1 with the hf engine")
            need(world_size % e.tensor_parallel_size == 0, "engine.tensor_parallel_size",
                 f"must divide the {world_size} rank(s) (one GPU each): use a divisor of {world_size}, or launch "
                 f"torchrun --nproc_per_node with a multiple of {e.tensor_parallel_size}")
            if ev.episodes_per_product > 0:  # the ranks of one engine must play as many evaluation batches
                n = ev.products or d.test_size
                need(n % world_size == 0, "eval.products",
                     f"{n} evaluation products do not divide over {world_size} ranks; with "
                     f"engine.tensor_parallel_size > 1 set eval.products to a multiple of {world_size}")
        need(t.steps >= 1, "train.steps", "must be >= 1")
        need(t.lr > 0 and math.isfinite(t.lr), "train.lr", "must be a positive finite number (the paper: 3e-5)")
        need(t.warmup_updates >= 0, "train.warmup_updates", "must be >= 0")
        need(t.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "must be 'constant' or 'cosine'")
        need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1] (a fraction of train.lr)")
        need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1), e.g. 0.9")
        need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1), e.g. 0.999")
        need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping)")
        need(t.updates_per_batch >= 1, "train.updates_per_batch", "must be >= 1 (1 = on-policy)")
        need(t.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1 (e.g. 16384)")
        need(t.loss_agg in LOSS_AGGS, "train.loss_agg", f"use one of {LOSS_AGGS}")
        need(t.dr_grpo_max_tokens >= 0, "train.dr_grpo_max_tokens", "must be >= 0 (0 = buyer_max_tokens * max_rounds)")
        need(0 <= t.eps_low < 1, "train.eps_low", "must be in [0, 1), e.g. 0.2")
        need(t.eps_high >= 0, "train.eps_high", "must be >= 0, e.g. 0.28")
        need(t.adv_scale in ADV_SCALES, "train.adv_scale", f"use one of {ADV_SCALES}")
        need(t.kl_coef >= 0, "train.kl_coef", "must be >= 0 (0 = no KL, the paper)")
        need(t.kl_before_last_round >= 0, "train.kl_before_last_round", "must be >= 0 (1 = every round alike)")
        need(t.tis_cap == 0 or t.tis_cap >= 1, "train.tis_cap", "use 0 (off) or a cap >= 1, e.g. 2.0")
        need(t.max_bad_updates >= 1, "train.max_bad_updates", "must be >= 1")
        need(t.sharding in SHARDINGS, "train.sharding", f"use one of {SHARDINGS}")
        if t.sharding == "fsdp2":
            need(self.model.quantization == "none", "train.sharding",
                 f"fsdp2 shards a bf16/fp32 base, not bitsandbytes 4-bit weights (model.quantization="
                 f"{self.model.quantization!r}): set model.quantization=none, or train.sharding=none")
        need(ev.episodes_per_product >= 0, "eval.episodes_per_product", "must be >= 0 (0 = no final evaluation)")
        need(ev.products >= 0, "eval.products", "must be >= 0 (0 = the whole test split)")
        need(ev.buyer_temperature >= 0, "eval.buyer_temperature", "must be >= 0")
        need(ev.batch_size >= 1, "eval.batch_size", "must be >= 1")
        need(ev.generalisation_episodes >= 0, "eval.generalisation_episodes", "must be >= 0 (0 = skip)")
        need(ev.generalisation_jitter >= 0, "eval.generalisation_jitter", "must be >= 0")
        need(all(x >= 0 for x in ev.generalisation_temperatures), "eval.generalisation_temperatures",
             "temperatures must be >= 0, e.g. [0.3, 1.0]")
        need(not ev.generalisation_temperatures or s.kind == "llm", "eval.generalisation_temperatures",
             "other temperatures of the LLM seller need seller.kind=llm; use [] for another seller")
        need(ev.best_response_products >= 1, "eval.best_response_products", "must be >= 1 (e.g. 16)")
        for path in ev.crossplay_buyers:
            need(os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")) or
                 os.path.isfile(os.path.join(path, "adapter_config.json")), "eval.crossplay_buyers",
                 f"{path!r} is not a checkpoint folder (no adapter/adapter_config.json): give train.py's "
                 f"runs/NAME/step_NNNNNN")
            import eval as evaluation
            base = crossplay_buyer_base(path)
            need(base is None or evaluation.same_model(base, self.model.name), "eval.crossplay_buyers",
                 f"{path!r} was trained on base {base!r}, this run's model.name is {self.model.name!r}: an adapter "
                 f"only means something on its own base; train that buyer on this base, or set model.name={base}")
        need(not ev.crossplay_buyers or self.selfplay.mode != "off", "eval.crossplay_buyers",
             "the cross-play table is written by self-play runs: set selfplay.mode, or drop eval.crossplay_buyers")
        self.validate_selfplay(need)
        need(lg.transcripts_per_step >= 0, "log.transcripts_per_step", "must be >= 0")
        need(bool(self.out_dir), "out_dir", "set a run folder, e.g. runs/my-run")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "use auto, cpu or cuda")
        need(self.world_size >= 0, "world_size", "must be >= 0 (0 = any number of ranks)")
        need(self.save_every >= 0, "save_every", "must be >= 0 (0 = only at the end)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(bool(self.resume), "resume", "use auto, never, or a checkpoint folder")
        if self.world_size and self.world_size != world_size:
            problems.append(f"world_size={self.world_size}: this run was launched with {world_size} rank(s); "
                            f"launch `torchrun --nproc_per_node {self.world_size} ...` or set world_size={world_size}")
        elif r.products_per_step >= 1 and r.products_per_step % world_size:
            fit = [n for n in range(world_size, 2 * r.products_per_step + world_size, world_size)]
            near = min(fit, key=lambda n: abs(n - r.products_per_step))
            problems.append(f"rollout.products_per_step={r.products_per_step}: does not divide over {world_size} "
                            f"ranks; use a multiple of {world_size}, e.g. {near}")
        if r.products_per_step >= 1 and r.group_size >= 2 and t.updates_per_batch >= 1 and not problems:
            local = r.products_per_step // world_size * r.group_size
            need(t.updates_per_batch <= local, "train.updates_per_batch",
                 f"each rank has only {local} episodes per step to cut into updates; use at most {local}")
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


    def validate_selfplay(self, need) -> None:
        sp = self.selfplay
        need(sp.mode in SELFPLAY_MODES, "selfplay.mode", f"use one of {SELFPLAY_MODES}")
        if sp.mode == "off":
            return
        weights = [sp.league_latest, sp.league_snapshots, sp.league_base, sp.league_scripted]
        need(all(w >= 0 for w in weights) and sum(weights) > 0, "selfplay.league_latest",
             "the league weights (league_latest, league_snapshots, league_base, league_scripted) must be >= 0 and "
             "not all 0, e.g. league_latest=0.5 league_snapshots=0.25 league_base=0.25")
        need(sp.switch_every >= 1, "selfplay.switch_every", "must be >= 1 (steps per side in alternate mode)")
        need(sp.seller_lr >= 0, "selfplay.seller_lr", "must be >= 0 (0 = train.lr)")
        need(sp.snapshot_every >= 1, "selfplay.snapshot_every", "must be >= 1")
        need(sp.max_snapshots >= 1, "selfplay.max_snapshots", "must be >= 1")
        need(self.seller.kind == "llm", "seller.kind",
             "self-play trains the seller as a second adapter of the same model: use seller.kind=llm")
        need(self.engine.kind == "hf" or self.engine.sync_strategy == "adapter", "engine.sync_strategy",
             "self-play serves two adapters and their snapshots from one vLLM engine; a merged engine holds one "
             "set of weights: use engine.sync_strategy=adapter (or engine.kind=hf)")
        need(self.engine.kind == "vllm" or self.train.sharding == "none", "train.sharding",
             "with the HF engine self-play's snapshots are extra peft adapters of the trainer's model, which FSDP2 "
             "would have to shard after the fact: use engine.kind=vllm (snapshots as LoRA slots) or "
             "train.sharding=none")


SELFPLAY_MODES = ("off", "alternate", "simultaneous")


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML file -> overrides -> typed dataclasses


def crossplay_buyer_base(path: str) -> str | None:
    """The base model a checkpoint's adapter was trained on (its adapter_config.json), or None if it names none."""
    import eval as evaluation
    try:
        adapter = evaluation.find_adapter(path)
    except FileNotFoundError:   # reported by the check before this one
        return None
    return json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or None


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; unknown keys and bad types fail."""
    raw: dict = {}
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    cfg = Config()
    for key, value in _flatten(raw):
        _set(cfg, key, value, source=path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override {item!r} is not key=value (e.g. train.lr=1e-5)")
        key, text = item.split("=", 1)
        _set(cfg, key.strip(), text, source="the command line")
    return cfg


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


def config_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. ['model.name', ..., 'train.lr', ...]."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys += config_keys(sub, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _flatten(raw: dict, prefix: str = ""):
    """{'train': {'lr': 1}} -> ('train.lr', 1); a mapping under a leaf key reaches _set and fails there."""
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(key):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _is_section(key: str) -> bool:
    obj = Config
    for part in key.split("."):
        hints = _hints(obj) if dataclasses.is_dataclass(obj) else {}
        if part not in hints:
            return False
        obj = hints[part]
    return dataclasses.is_dataclass(obj)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)  # resolves "list[str]" annotations (from __future__ import annotations)


def _set(cfg: Config, key: str, value, source: str | None) -> None:
    where = f" (on {source})" if source == "the command line" else (f" (in {source})" if source else "")
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        cls = type(obj)
        hints = _hints(cls) if dataclasses.is_dataclass(obj) else {}
        if part not in hints:
            raise ConfigError(f"unknown config key {key!r}{where}; {_suggest(key)}")
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            continue
        kind = hints[part]
        if dataclasses.is_dataclass(kind):
            raise ConfigError(f"{key!r}{where} is a section, not a value: set its fields, e.g. "
                              f"{key}.{dataclasses.fields(kind)[0].name}=...")
        try:
            setattr(obj, part, convert(value, kind))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}={_show(value)}{where}: {e}") from None


# What other trainers (TRL, verl, nanoGPT) call some of our fields: a user typing theirs gets ours suggested.
ALIASES = {"learning_rate": "train.lr", "max_steps": "train.steps", "num_generations": "rollout.group_size",
           "beta": "train.kl_coef", "epsilon": "train.eps_low", "epsilon_high": "train.eps_high",
           "max_grad_norm": "train.grad_clip", "warmup_steps": "train.warmup_updates",
           "max_completion_length": "rollout.buyer_max_tokens", "temperature": "rollout.buyer_temperature",
           "model_name": "model.name", "output_dir": "out_dir", "num_iterations": "train.updates_per_batch"}


def _suggest(key: str) -> str:
    keys = config_keys()
    section, _, leaf = key.rpartition(".")
    prefix = section + "." if section else ""
    siblings = [k[len(prefix):] for k in keys if k.startswith(prefix) and "." not in k[len(prefix):]]
    if not section:  # top level: the sections are valid names too
        siblings += list(dict.fromkeys(k.split(".")[0] for k in keys if "." in k))
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]                       # right name, wrong section
    close += [ALIASES[leaf]] if leaf in ALIASES else []                             # another trainer's name
    if siblings:                                                                    # a typo or a longer name
        close += [prefix + m for m in difflib.get_close_matches(leaf, siblings, n=2, cutoff=0.6)]
        close += [prefix + m for m in siblings if leaf.startswith(m + "_") or m.startswith(leaf + "_")]
    else:                                                                           # a typo in the section
        close += difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))[:3]
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"valid keys{' in ' + section if siblings and section else ''}: {', '.join(siblings or keys)}"


def convert(value, kind):
    """Value (from YAML, or a command-line string) -> the field's type. Raises ValueError saying what was expected."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected text, got {type(value).__name__}")
        return "" if value is None else str(value)
    if isinstance(value, str) and kind is not str:
        value = _parse_text(value, kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ValueError("expected a whole number")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number, e.g. 3e-5")
        return float(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, e.g. [a, b], got {type(value).__name__}")
        (item,) = args or (str,)
        return [convert(v, item) for v in value]
    raise TypeError(f"config fields of type {kind} are not supported")


def _parse_text(text: str, kind):
    """A command-line or YAML string -> a Python value. YAML 1.1 reads '3e-5' as text, so numbers get float()."""
    s = text.strip()
    if kind is float or kind is int:
        try:
            return float(s) if kind is float else (int(s) if s.lstrip("+-").isdigit() else float(s))
        except ValueError:
            raise ValueError(f"expected a {'number' if kind is float else 'whole number'}, got {text!r}") from None
    if kind is bool:
        low = s.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if typing.get_origin(kind) is list:
        if s.startswith("["):
            try:
                return yaml.safe_load(s)
            except yaml.YAMLError as e:
                raise ValueError(f"expected a list like [a, b]: {e}") from None
        return s
    return text


def _get(cfg, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)
