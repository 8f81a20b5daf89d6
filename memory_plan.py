"""Per-GPU memory of GRPO on Qwen3-30B-A3B-Instruct-2507 with colocated vLLM, and the sharding that makes it fit.

    python memory_plan.py                                   # the real 30B architecture, 8 x H100 80 GB
    python memory_plan.py config.yaml                       # LoRA targets and micro-batch from a training config
    python memory_plan.py --micro-batch-tokens 8192 --kv-cache-gib 20 --vllm-tp 4 --gpus 8

It builds the architecture on the meta device (no weights, no download: the public config values are below),
applies the LoRA targets with peft, counts parameters per kind and prints, for each candidate plan, the bytes per
GPU of base weights, LoRA weights, gradients, optimiser state, FSDP gather buffers, activations (an estimate,
stated as such), vLLM weights, vLLM's LoRA buffers and KV cache, while loading (every rank first loads the whole
bf16 model onto its GPU, then shards it), during generation and during training; then the host memory of the
node: sleep level 1's pinned copy of every engine's weights and the adapter copies of a sync, /dev/shm included.
`check_host_memory` is train.py's start-up check of the latter against MemAvailable and /dev/shm.

Why the chosen plan (fsdp2-bf16):
transformers 5 stores Qwen3-MoE experts as fused 3-D parameters, which bitsandbytes does not quantise: "QLoRA"
on this model quantises only attention (0.9 B of 30.5 B parameters) and leaves 58 GB of bf16 experts on every GPU.
Next to a vLLM copy of the weights that cannot fit in 80 GB. Instead the trainer keeps the base in bf16 and shards
it over the 8 GPUs with FSDP2 (7.1 GiB each; one decoder layer is gathered at a time), LoRA in fp32 and AdamW
sharded likewise. vLLM holds its own bf16 copy with tensor parallelism 2 (28.4 GiB per GPU + 1.4 GiB of LoRA
buffers; 4 engines), serves the buyer through the LoRA adapter and the seller from the same base, and sleeps
(level 1) while the trainer runs (parking about 240 GiB of pinned copies in the node's RAM). Trainer and engine
then hold the same bf16 base, so the engine-trainer log-prob gap is bf16 noise, not quantisation error.
Quantising the experts ourselves (NF4, ~15 GiB) would also fit, but needs an MoE kernel of our own and puts a
quantisation gap between trainer and engine; FSDP2 is stock PyTorch.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch

GIB = 2**30

# Public config.json of Qwen/Qwen3-30B-A3B-Instruct-2507 (checked against the model card: 30.5 B parameters,
# 48 layers, 32 query / 4 key-value heads, 128 experts with 8 active, 262,144-token native context).
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    intermediate_size=6144, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=262144,
    rope_theta=10_000_000, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
    hidden_act="silu", attention_bias=False,
)
QWEN3_30B_A3B_NAME = "Qwen/Qwen3-30B-A3B-Instruct-2507"


@dataclass
class Hardware:
    gpus: int = 8  # GPUs in the node (one training rank each)
    gpu_gib: float = 79.6  # usable memory of one H100 80 GB as CUDA reports it
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation: never available to tensors


@dataclass
class Workload:
    micro_batch_tokens: int = 4096  # tokens in one trainer forward/backward (sequences packed by token budget)
    kv_cache_gib: float = 16.0  # vLLM KV cache per GPU (gpu_memory_utilization is set to reach it)
    gradient_checkpointing: bool = True  # keep one hidden state per layer, recompute the rest in backward
    adapters: int = 1  # trained LoRA adapters, each with its gradients and AdamW state (self-play: 2, buyer + seller)
    max_loras: int = 1  # adapters vLLM serves at once (self-play: both sides + each side's snapshots)


def workload_of(cfg) -> dict:
    """The Workload fields a training config fixes: micro-batch tokens, and with self-play two trained adapters
    and vLLM slots for both plus every side's snapshots (train.build_engine's max_loras)."""
    sp = cfg.selfplay
    selfplay = sp.mode != "off"
    return {"micro_batch_tokens": cfg.train.micro_batch_tokens, "adapters": 2 if selfplay else 1,
            "max_loras": 2 + 2 * sp.max_snapshots if selfplay else 1}


def lora_buffers_key(rows: dict) -> str:
    return next(k for k in rows if k.startswith("vLLM LoRA buffers"))


@dataclass
class Plan:
    name: str
    trainer: str  # "ddp": every GPU holds the whole trainer model; "fsdp2": base, LoRA and AdamW sharded over GPUs
    base_format: str  # "bf16" | "bnb4" (bitsandbytes: nn.Linear only) | "nf4_experts" (bnb4 + experts quantised by us)
    vllm_tp: int  # tensor-parallel size of each vLLM engine (gpus / vllm_tp engines)
    sleep: bool = True  # vLLM sleep level 1 during training: KV cache freed, weights moved to host memory
    note: str = ""


CANDIDATES = [
    Plan("qlora-ddp", "ddp", "bnb4", 2, note="bitsandbytes 4-bit as configured: experts stay bf16"),
    Plan("nf4-experts-ddp", "ddp", "nf4_experts", 2, note="experts quantised by us to NF4 (needs our own MoE kernel)"),
    Plan("fsdp2-bf16-tp1", "fsdp2", "bf16", 1, note="one whole bf16 vLLM copy per GPU"),
    Plan("fsdp2-bf16", "fsdp2", "bf16", 2, note="chosen"),
    Plan("fsdp2-bf16-awake", "fsdp2", "bf16", 2, sleep=False, note="engine.sleep=false: no host copies, vLLM stays "
         "on the GPUs while training"),
]
CHOSEN = "fsdp2-bf16"


# ---- the architecture on the meta device ----------------------------------------------------------------------

def load_run_config(path: str | None):
    """(model.ModelConfig, the Workload fields the config fixes: workload_of) from a training config file, read
    by config.py (strict: unknown keys fail); without one, config.yaml's model: Qwen3-30B-A3B-Instruct-2507 with
    LoRA r=16 on attention and the fused experts, and {}."""
    from model import ModelConfig

    if path is None:
        return ModelConfig(name=QWEN3_30B_A3B_NAME, lora_r=16, lora_alpha=32,
                           lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), {}
    from config import load_config

    cfg = load_config(path)
    return cfg.model, workload_of(cfg)


def meta_model(name: str):
    """The architecture with no storage: from a local folder's config.json, or the hard-coded 30B config (no
    internet here, and the shapes are all the plan needs)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig

    if os.path.isfile(os.path.join(name, "config.json")):
        config = AutoConfig.from_pretrained(name)
    elif name == QWEN3_30B_A3B_NAME:
        config = Qwen3MoeConfig(**QWEN3_30B_A3B)
    else:
        raise ValueError(f"model.name={name!r}: the memory plan knows {QWEN3_30B_A3B_NAME!r} or a local folder with "
                         f"config.json (nothing is downloaded)")
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def parameter_groups(model) -> dict[str, int]:
    """Parameter counts by what they are, because each kind is stored differently: fused 3-D experts (never
    touched by bitsandbytes), nn.Linear layers (attention; quantisable), embeddings + lm_head, the rest."""
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    groups = {"experts": 0, "linear": 0, "embeddings": 0, "other": 0}
    for name, p in model.named_parameters():
        if p.ndim == 3 and ".experts." in f".{name}":
            groups["experts"] += p.numel()
        elif name in embeddings or name.startswith("lm_head."):
            groups["embeddings"] += p.numel()
        elif name in linear_weights:
            groups["linear"] += p.numel()
        else:
            groups["other"] += p.numel()
    return groups


def lora_numel(model, cfg) -> int:
    """Trainable LoRA parameters for cfg's targets, counted by peft itself on the meta model."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules) or None,
                      target_parameters=list(cfg.lora_target_parameters) or None)
    peft_model = get_peft_model(model, lora)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@dataclass
class Arch:
    layers: int
    hidden: int
    q_dim: int  # heads * head_dim
    kv_heads: int
    head_dim: int
    vocab: int
    experts_per_tok: int
    moe_intermediate: int  # the expert MLP width (MoE) or the MLP width (dense)
    experts: int = 0  # routed experts per layer; 0 = a dense MLP in every layer

    @classmethod
    def of(cls, model):
        c = model.config
        return cls(c.num_hidden_layers, c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads,
                   c.head_dim, c.vocab_size, getattr(c, "num_experts_per_tok", 1),
                   getattr(c, "moe_intermediate_size", c.intermediate_size), getattr(c, "num_experts", 0) or 0)


# ---- bytes per GPU ----------------------------------------------------------------------------------------------

# bitsandbytes NF4 with double quantisation: 4 bits + one 8-bit absmax per 64 weights + fp32 scale per 256 absmax.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def base_weight_bytes(groups: dict[str, int], base_format: str) -> float:
    quantised = {"bf16": 0, "bnb4": groups["linear"], "nf4_experts": groups["linear"] + groups["experts"]}[base_format]
    return quantised * NF4_BYTES_PER_PARAM + (sum(groups.values()) - quantised) * 2


def activation_bytes(arch: Arch, tokens: int, checkpointing: bool) -> float:
    """An ESTIMATE of the trainer's activation peak for one micro-batch of `tokens` tokens (bf16 activations).
    - With checkpointing: one saved hidden state per layer, plus one layer's recomputed internals in backward.
    - One layer's internals, kept for backward: attention q, k, v, attention output, o_proj output; MoE: each token's
      8 experts' gate, up, activation and down outputs, router logits (fp32).
    - The logits: bf16 logits, fp32 log-softmax and its gradient over the whole vocabulary (the largest term;
      computing the log-probs in chunks of tokens would remove most of it)."""
    kv_dim = arch.kv_heads * arch.head_dim
    attention = tokens * (2 * arch.q_dim + 2 * kv_dim + arch.hidden) * 2
    moe = tokens * arch.experts_per_tok * (3 * arch.moe_intermediate + arch.hidden) * 2 + tokens * 128 * 4
    per_layer = attention + moe + tokens * arch.hidden * 2 * 4  # + norms / residuals
    logits = tokens * arch.vocab * (2 + 4 + 4)
    layers = arch.hidden * tokens * 2 * arch.layers + per_layer if checkpointing else per_layer * arch.layers
    return layers + logits


def kv_bytes_per_token(arch: Arch, tp: int) -> float:
    """K and V of every layer for one token, on one GPU of a tensor-parallel engine (bf16)."""
    return arch.layers * 2 * max(arch.kv_heads // tp, 1) * arch.head_dim * 2


def vllm_lora_buffer_bytes(arch: Arch, rank: int, tp: int, max_loras: int = 1,
                           dtype_bytes: int = 2) -> dict[str, float]:
    """The LoRA slots vLLM allocates on one GPU of a tensor-parallel engine when LoRA is enabled, whatever the
    adapter targets: with LoRAConfig.target_modules unset (vllm_engine.py sets none) every linear layer, the MoE
    block, the embedding and lm_head get zero-filled stacks of `max_loras` slots of rank `rank` (vLLM rounds
    lora_r up to one of its allowed ranks), in the model dtype (lora_dtype "auto"). From vLLM 0.32.0's source:
    - vllm/lora/layers/fused_moe.py, FusedMoEWithLoRA._create_lora_a_weights / _create_lora_b_weights (the
      wrapper Qwen3-MoE gets: its is_3d_moe_weight is False; gated, so _w13_slices = 2, gate and up each with
      their own A and B). Without fully_sharded_loras or expert parallelism, per layer:
        w13 A: 2 x (max_loras, experts, rank, hidden)            not sharded
        w13 B: 2 x (max_loras, experts, intermediate / tp, rank)
        w2  A:     (max_loras, experts, rank, intermediate / tp)
        w2  B:     (max_loras, experts, hidden, rank)              not sharded
    - vllm/lora/layers/column_parallel_linear.py (MergedQKVParallelLinearWithLoRA: one A of (rank, hidden) per
      q, k, v slice, B of the TP-local slice widths; MergedColumnParallelLinearWithLoRA for a dense gate_up),
      base_linear.py (RowParallelLinear o_proj / down_proj: A of (rank, input / tp), B of (output, rank);
      ReplicatedLinear router gate: A (rank, hidden), B (experts, rank)), vocab_parallel_embedding.py
      (A (vocab, rank), B (hidden, rank)) and logits_processor.py (lm_head: A (rank, hidden), B (vocab, rank)).
    All of it lives in vLLM's "weights" memory pool, so sleep level 1 copies it to host memory with the weights.
    Returns bytes by part: "experts" (the MoE stacks) and "dense" (attention, router or dense MLP, embeddings)."""
    h, inter = arch.hidden, arch.moe_intermediate // tp
    q, kv = arch.q_dim // tp, max(arch.kv_heads // tp, 1) * arch.head_dim
    experts = arch.experts * (2 * rank * h + 2 * inter * rank + rank * inter + h * rank) if arch.experts else 0
    attention = 3 * rank * h + (q + 2 * kv) * rank + rank * q + h * rank  # qkv A, qkv B, o_proj A, o_proj B
    if arch.experts:
        mlp = rank * h + arch.experts * rank  # the router gate
    else:
        mlp = 2 * rank * h + 2 * inter * rank + rank * inter + h * rank  # dense gate_up (2 slices) and down_proj
    embeddings = 2 * (arch.vocab * rank + h * rank)  # embed_tokens and lm_head
    scale = max_loras * dtype_bytes
    return {"experts": arch.layers * experts * scale,
            "dense": (arch.layers * (attention + mlp) + embeddings) * scale}


def vllm_lora_rank(lora_r: int) -> int:
    """The max_lora_rank vllm_engine.py gives vLLM for a LoRA rank: the smallest allowed rank >= lora_r."""
    from vllm_engine import VLLM_LORA_RANKS

    return next(r for r in VLLM_LORA_RANKS if r >= lora_r)


def plan_rows(plan: Plan, groups: dict[str, int], lora: int, arch: Arch, hw: Hardware, work: Workload,
              vllm_rank: int = 16) -> dict:
    """Bytes per GPU, by item, for one plan. lora: trainable LoRA parameters; vllm_rank: vLLM's max_lora_rank."""
    shard = hw.gpus if plan.trainer == "fsdp2" else 1
    total_params = sum(groups.values())
    n = work.adapters  # self-play: the buyer's and the seller's adapter, each with gradient buffers and AdamW
    rows = {
        "base weights (trainer)": base_weight_bytes(groups, plan.base_format) / shard,
        "LoRA weights (fp32)": n * lora * 4 / shard,
        "LoRA gradients (fp32)": n * lora * 4 / shard,   # kept (zeroed) between updates: one buffer per adapter
        "AdamW state (fp32 m, v)": n * lora * 8 / shard,
        # FSDP2 gathers one decoder layer for compute and prefetches the next: two bf16 layers in flight.
        "FSDP2 gather buffers": (2 * (total_params - groups["embeddings"]) / arch.layers * 2
                                 if plan.trainer == "fsdp2" else 0.0),
        "activations (estimate)": activation_bytes(arch, work.micro_batch_tokens, work.gradient_checkpointing),
        "vLLM weights (bf16)": total_params * 2 / plan.vllm_tp,
        f"vLLM LoRA buffers (max_loras={work.max_loras})": sum(vllm_lora_buffer_bytes(
            arch, vllm_rank, plan.vllm_tp, work.max_loras).values()),
        "vLLM KV cache": work.kv_cache_gib * GIB,
        "reserve (context, NCCL, fragmentation)": hw.reserve_gib * GIB,
    }
    reserve = rows["reserve (context, NCCL, fragmentation)"]
    resident = ("base weights (trainer)", "LoRA weights (fp32)", "AdamW state (fp32 m, v)")
    trainer_resident = sum(rows[k] for k in resident)
    vllm = rows["vLLM weights (bf16)"] + rows[lora_buffers_key(rows)] + rows["vLLM KV cache"]
    # Every rank first loads the whole model onto its GPU (from_pretrained with device_map), adds LoRA, and only
    # then shards it (train.py returns the full copy to CUDA before the engine starts): the first peak.
    rows["= loading (whole model, before sharding)"] = (base_weight_bytes(groups, plan.base_format) + n * lora * 4
                                                        + reserve)
    rows["= during generation"] = trainer_resident + vllm + reserve
    rows["= during training"] = (trainer_resident + rows["LoRA gradients (fp32)"] + rows["FSDP2 gather buffers"]
                                 + rows["activations (estimate)"] + reserve + (0.0 if plan.sleep else vllm))
    return rows


def adapter_file_bytes(lora: int) -> float:
    """One adapter as vllm_engine.save_adapter writes it: every LoRA parameter, experts included, in bf16."""
    return lora * 2


def host_rows(plan: Plan, gpu_rows: dict, lora: int, ranks: int, adapter_sync: bool = True, adapters: int = 1,
              max_loras: int = 1) -> dict:
    """Host memory (RAM) of one node with `ranks` training ranks, by item, at the peak of a sync.
    - Sleep level 1 copies each GPU's vLLM weights pool (weights and LoRA buffers) into freshly pinned host memory
      (vllm/device_allocator/cumem.py, CuMemAllocator.sleep). Wake-up drops the tensors, but PyTorch's pinned
      host allocator keeps the blocks cached (vLLM empties it only at shutdown), so they count all run long.
    - Every sync (vllm_engine.sync_adapter) builds the whole adapter on the CPU (adapter_state_dict), deletes the
      served adapter's files (vLLM read them into memory when it loaded it) and writes the new ones to /dev/shm,
      and vLLM holds the adapter it serves in pinned host memory (vllm/lora/worker_manager.py loads it with
      device="cpu"; lora_model.py pins it): each rank's peak is the CPU copy + one file + vLLM's copy of the
      previous adapter. use_adapter removes the old LoRA from vLLM before the new one loads, so vLLM never holds
      two.
    Self-play (adapters=2, max_loras slots): a sync may write both sides' adapters, and vLLM pins every adapter it
    serves (both sides and the snapshots, which are read from out_dir on disk).
    /dev/shm is RAM (tmpfs), so its files count in both the RAM total and the /dev/shm line. Not counted: each
    process's own memory (Python, CUDA context, libraries: a few GiB per rank) and the page cache of the
    checkpoint files (reclaimable)."""
    per_gpu_sleep = gpu_rows["vLLM weights (bf16)"] + gpu_rows[lora_buffers_key(gpu_rows)]
    adapter = adapter_file_bytes(lora) if adapter_sync else 0.0
    rows = {
        "sleep level 1: pinned copy of vLLM weights + LoRA": ranks * per_gpu_sleep if plan.sleep else 0.0,
        "sync: adapter state dict on the CPU": ranks * adapter * adapters,
        "sync: vLLM's pinned copy of the adapter": ranks * adapter * max(adapters, max_loras),
        "sync: /dev/shm adapter files": ranks * adapter * adapters,
    }
    rows["= host RAM at a sync"] = sum(rows.values())
    return rows


VLLM_WORKSPACE_GIB = 2.0  # vLLM's own activations / sampler buffers inside its memory share (profiled at start)


def gpu_memory_utilization(rows: dict, hw: Hardware) -> float:
    """The vLLM share of the GPU that holds its weights, its LoRA buffers, the planned KV cache and its workspace."""
    vllm = (rows["vLLM weights (bf16)"] + rows[lora_buffers_key(rows)] + rows["vLLM KV cache"]
            + VLLM_WORKSPACE_GIB * GIB)
    return vllm / (hw.gpu_gib * GIB)


PEAKS = ("= loading (whole model, before sharding)", "= during generation", "= during training")


def fits(rows: dict, hw: Hardware) -> bool:
    return max(rows[k] for k in PEAKS) <= hw.gpu_gib * GIB


def format_report(cfg, groups, lora, arch, hw, work, plans=CANDIDATES) -> str:
    total = sum(groups.values())
    lines = [
        f"{cfg.name}: {total / 1e9:.2f} B parameters (experts {groups['experts'] / 1e9:.2f} B as fused 3-D tensors, "
        f"linear {groups['linear'] / 1e9:.2f} B, embeddings {groups['embeddings'] / 1e9:.2f} B, "
        f"other {groups['other'] / 1e6:.1f} M); LoRA r={cfg.lora_r} on {list(cfg.lora_target_modules)} "
        f"+ {list(cfg.lora_target_parameters)}: {lora / 1e6:.1f} M trainable",
        f"{hw.gpus} x {hw.gpu_gib} GiB; micro-batch {work.micro_batch_tokens} tokens "
        f"(checkpointing {'on' if work.gradient_checkpointing else 'off'}); KV cache {work.kv_cache_gib} GiB/GPU"
        + (f"; self-play: {work.adapters} trained adapters, {work.max_loras} vLLM LoRA slots"
           if work.adapters > 1 else ""),
        "",
    ]
    rank = vllm_lora_rank(cfg.lora_r)
    all_rows = {p.name: plan_rows(p, groups, lora, arch, hw, work, rank) for p in plans}
    host = {p.name: host_rows(p, all_rows[p.name], lora, hw.gpus, adapters=work.adapters, max_loras=work.max_loras)
            for p in plans}
    width = max(len(k) for k in [*next(iter(all_rows.values())), *next(iter(host.values()))])

    def table(title, rows_by_plan, *first):
        out = [f"{title:<{width}}" + "".join(f"{p.name:>18}" for p in plans), *first]
        for key in next(iter(rows_by_plan.values())):
            out.append(f"{key:<{width}}" + "".join(f"{rows_by_plan[p.name][key] / GIB:>18.2f}" for p in plans))
        return out

    lines += table("GiB per GPU", all_rows, f"{'trainer / base / vLLM TP':<{width}}"
                   + "".join(f"{f'{p.trainer}/{p.base_format}/{p.vllm_tp}':>18}" for p in plans))
    lines.append(f"{'fits in ' + str(hw.gpu_gib) + ' GiB':<{width}}"
                 + "".join(f"{('yes' if fits(all_rows[p.name], hw) else 'NO'):>18}" for p in plans))
    lines.append("")
    lines += table(f"GiB per node, host ({hw.gpus} ranks)", host)
    lines.append(f"{'/dev/shm needed':<{width}}"
                 + "".join(f"{host[p.name]['sync: /dev/shm adapter files'] / GIB:>18.2f}" for p in plans))
    lines.append("")
    buffers = vllm_lora_buffer_bytes(arch, rank, 2, work.max_loras)
    lines.append(f"vLLM LoRA buffers at TP 2, max_lora_rank {rank}, {work.max_loras} slot(s): experts {buffers['experts'] / GIB:.2f} GiB + "
                 f"attention, router, embeddings {buffers['dense'] / GIB:.2f} GiB per GPU; adapter file "
                 f"{adapter_file_bytes(lora) / 1e9:.2f} GB (bf16) per rank and sync")
    for p in plans:
        engines = hw.gpus // p.vllm_tp
        kv_tokens = work.kv_cache_gib * GIB / kv_bytes_per_token(arch, p.vllm_tp)
        share = gpu_memory_utilization(all_rows[p.name], hw)
        lines.append(f"{p.name}: {p.note}; {engines} vLLM engines, KV cache for {kv_tokens / 1e3:.0f} k tokens each; "
                     f"engine.gpu_memory_utilization={share:.2f}")
    lines.append(f"chosen: {CHOSEN} (see the docstring of memory_plan.py for why); activations are an estimate.")
    return "\n".join(lines)


# ---- the host-memory check train.py runs at start-up ------------------------------------------------------------

class HostMemoryError(RuntimeError):
    """This node's RAM cannot hold what vLLM's sleep mode and the adapter sync will put there."""


def host_memory_need(cfg, ranks_per_node: int, cuda: bool) -> dict[str, float]:
    """host_rows for a training config (config.Config) on a node with `ranks_per_node` ranks; {} when the engine
    is not vLLM. Sleep copies only happen on CUDA with engine.sleep; adapter files only with sync_strategy=adapter.
    Everything here is in the engine's dtype (weights, LoRA buffers, adapter): a float32 engine doubles it."""
    if cfg.engine.kind != "vllm":
        return {}
    from model import DTYPES

    try:
        model = meta_model(cfg.model.name)
    except ValueError:  # another hub id: its config.json from the hub or cache, as loading is about to need it
        import model as model_lib

        model = model_lib.meta_model(cfg.model)
    groups, arch, lora = parameter_groups(model), Arch.of(model), lora_numel(model, cfg.model)
    plan = Plan("this run", "fsdp2", "bf16", cfg.engine.tensor_parallel_size, sleep=cfg.engine.sleep and cuda)
    work = Workload(**workload_of(cfg))
    gpu = plan_rows(plan, groups, lora, arch, Hardware(gpus=ranks_per_node), work, vllm_lora_rank(cfg.model.lora_r))
    rows = host_rows(plan, gpu, lora, ranks_per_node, adapter_sync=cfg.engine.sync_strategy == "adapter",
                     adapters=work.adapters, max_loras=work.max_loras)
    scale = DTYPES[cfg.model.dtype].itemsize / 2
    return {k: v * scale for k, v in rows.items()}


def host_memory_verdict(need: dict[str, float], ram_available: float | None, shm_free: float | None,
                        ram_source: str = "MemAvailable") -> str:
    """One line on the host-memory need against what the node has; raises HostMemoryError when RAM is short.
    shm_free: free bytes in /dev/shm, None where vllm_engine cannot use it (the adapters then go to the temp dir).
    Adapters that do not fit in /dev/shm are not counted as RAM (they go to disk: slower syncs, not a failure)."""
    if not need:
        return ""
    shm_key = "sync: /dev/shm adapter files"
    shm = need[shm_key]
    counted = {k: v for k, v in need.items() if v and not k.startswith("=")}
    notes = []
    if shm and shm_free is not None and shm > shm_free:
        notes.append(f"the {shm / GIB:.1f} GiB of adapter files do not fit in /dev/shm ({shm_free / GIB:.2f} GiB "
                     f"free) and go to disk (slower syncs): give /dev/shm {math.ceil(shm / GIB) + 1} GiB "
                     f"(Docker: --shm-size={math.ceil(shm / GIB) + 1}g)")
    if shm_free is None or shm > shm_free:
        counted.pop(shm_key, None)
    ram = sum(counted.values())
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in counted.items())
    summary = f"host memory: about {ram / GIB:.0f} GiB of RAM on this node at a sync ({parts} GiB)"
    if ram_available is None:
        notes.append(f"RAM not checked ({ram_source})")
    elif ram > ram_available:
        raise HostMemoryError(
            f"{summary}, but only {ram_available / GIB:.0f} GiB is available ({ram_source}); not counted: each "
            f"process's own few GiB. Fix: engine.sleep=false (no pinned copies; plan fsdp2-bf16-awake of "
            f"`python memory_plan.py CONFIG` shows whether the GPUs then hold vLLM while training), or more RAM")
    else:
        summary += f", {ram_available / GIB:.0f} GiB available ({ram_source})"
    return "; ".join([summary, *notes])


def available_ram(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> tuple[float | None, str]:
    """(bytes, where from): MemAvailable of /proc/meminfo, lowered inside a container with a memory limit (Docker
    --memory: /proc/meminfo shows the whole host there) to the cgroup's limit minus its usage, less the
    reclaimable page cache (inactive files), which the cgroup counts as used."""
    try:
        with open(meminfo) as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None, f"no MemAvailable in {meminfo}"
    best, source = kib * 1024.0, f"MemAvailable in {meminfo}"
    for folder, limit, usage, cache in ((cgroup, "memory.max", "memory.current", "inactive_file"),  # v2
                                        (f"{cgroup}/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                         "total_inactive_file")):  # v1
        try:
            with open(f"{folder}/{limit}") as f, open(f"{folder}/{usage}") as g, open(f"{folder}/memory.stat") as h:
                stat = dict(line.split() for line in h)
                left = int(f.read()) - int(g.read()) + int(stat.get(cache, 0))
        except (OSError, ValueError):  # no such cgroup, or "max" (no limit)
            continue
        if left < best:
            best, source = float(left), f"the memory limit of this container ({folder}/{limit})"
        break
    return best, source


def shm_free_bytes(path: str = "/dev/shm") -> float | None:
    """Free bytes in /dev/shm, or None where vllm_engine would not use it (missing or not writable)."""
    if not (os.path.isdir(path) and os.access(path, os.W_OK)):
        return None
    st = os.statvfs(path)
    return float(st.f_bavail * st.f_frsize)


def check_host_memory(cfg, ranks_per_node: int, cuda: bool | None = None) -> str:
    """train.py's start-up check: a one-line summary of the host RAM and /dev/shm this run needs against what the
    node has ("" when the engine is not vLLM); raises HostMemoryError with the need, what is available and the fix
    when RAM is short. Builds the architecture on the meta device (seconds; nothing is downloaded)."""
    need = host_memory_need(cfg, ranks_per_node, torch.cuda.is_available() if cuda is None else cuda)
    ram, source = available_ram()
    return host_memory_verdict(need, ram, shm_free_bytes(), source)


# ---- the code part of the plan: FSDP2 sharding of the trainer's model ------------------------------------------

def shard_with_fsdp2(model, mesh=None):
    """Shard the peft model's base, LoRA weights (and so AdamW state) over the ranks with FSDP2: one unit per
    decoder layer (gathered just before its forward/backward, freed after), one for the rest. Frozen bf16 base and
    trainable LoRA live in the same unit: FSDP2 reduce-scatters gradients only for parameters that have them.
    Call after the peft model is built and before the optimiser is created; returns the same object."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def decoder_layers(model):
    """The transformer blocks of a (peft-wrapped) causal LM: model.model.layers in every HF decoder we use."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__} has no .model.layers: shard_with_fsdp2 knows HF decoder-only LMs")
    return layers


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help="YAML file whose model: section sets name and LoRA targets")
    for f in Hardware.__dataclass_fields__.values():
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    for f in Workload.__dataclass_fields__.values():  # default None: the config file's value, else the dataclass's
        if f.type in ("bool", bool):
            ap.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None)
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    ap.add_argument("--vllm-tp", type=int, default=None, help="also show the chosen plan with this vLLM TP size")
    args = ap.parse_args(argv)
    cfg, from_config = load_run_config(args.config)
    hw = Hardware(**{k: getattr(args, k) for k in Hardware.__dataclass_fields__})
    given = {k: getattr(args, k) for k in Workload.__dataclass_fields__ if getattr(args, k) is not None}
    for k, v in from_config.items():
        given.setdefault(k, v)
    work = Workload(**given)
    if hw.gpus < 1 or work.micro_batch_tokens < 1 or work.kv_cache_gib < 0:
        raise ValueError("--gpus and --micro-batch-tokens must be >= 1 and --kv-cache-gib >= 0")
    model = meta_model(cfg.name)
    groups, arch = parameter_groups(model), Arch.of(model)
    lora = lora_numel(model, cfg)
    plans = list(CANDIDATES)
    if args.vllm_tp:
        if hw.gpus % args.vllm_tp:
            raise ValueError(f"--vllm-tp {args.vllm_tp} must divide --gpus {hw.gpus}")
        plans.append(Plan(f"{CHOSEN}-tp{args.vllm_tp}", "fsdp2", "bf16", args.vllm_tp, note="requested TP size"))
    report = format_report(cfg, groups, lora, arch, hw, work, plans)
    print(report)
    return report


if __name__ == "__main__":
    main()
