"""GRPO for a negotiating buyer, in plain PyTorch. Read top to bottom: config, ranks, model, engine, players, loop.

    python model.py runs/tiny-model && python train.py configs/tiny.yaml model.name=runs/tiny-model   # CPU smoke
    python train.py configs/cpu.yaml                                     # the CPU run that learns (minutes)
    torchrun --nproc_per_node 2 train.py configs/tiny.yaml model.name=runs/tiny-model   # 2 ranks, gloo on CPU
    torchrun --nproc_per_node 8 train.py config.yaml                     # the paper's run: Qwen3-30B-A3B, 8 GPUs
    torchrun --nproc_per_node 2 train.py configs/tiny.yaml model.name=runs/tiny-model train.sharding=fsdp2  # FSDP2
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py config.yaml \
        world_size=16                                                    # two nodes: torchrun's own multi-node
    python train.py config.yaml train.lr=1e-5 out_dir=runs/lr1e-5        # any field: dotted key=value (config.py)

The same command resumes (resume=auto: the newest complete checkpoint in out_dir). The run folder holds
config.yaml (resolved), metrics.jsonl (one line per step), transcripts.jsonl (a few full episodes per step),
step_NNNNNN/ (adapter/ in peft format, trainer.pt: optimiser, scheduler, RNG of every rank, step, data position;
config.yaml), and with eval.episodes_per_product > 0 eval_before.json and final_eval.json.

One step:
 1. Every rank takes its share of the step's products (the train split, reshuffled each epoch) and plays
    `group_size` episodes of each against the seller, all in lockstep (env.play: batched generation).
 2. reward.py scores each episode. Advantage = reward minus the mean reward of its group (the same product);
    not divided by the group's std (the paper), unless train.adv_scale=std.
 3. The trainer recomputes the log-probs of the buyer's generated tokens (the "old" policy, no gradient), in
    micro-batches packed by a token budget, with the engine's temperature applied to the logits (computed only
    at the buyer's tokens: head_only_at).
 4. The clipped surrogate loss (`policy_loss`) on exactly the tokens the buyer generated: prompt, seller and
    chat-template tokens have mask 0 and get no gradient. Token-level normalisation over the whole batch
    (DAPO) by default; asymmetric clip 0.2 / 0.28 (DAPO's clip-higher).
 5. AdamW on the LoRA parameters, warm-up, gradient clipping; the gradient all-reduce across ranks is one
    visible call. The engine then receives the new weights (a no-op for the HF engine, which shares them).

Self-play (selfplay.mode: alternate | simultaneous; league.py): the seller is a second LoRA adapter on the same
base and learns by GRPO too, on its own tokens and its own verifiable reward (reward.seller_score). A side (its
adapter, parameters, optimiser, scheduler, reward, temperature) is a `Side`; steps 2-3 run once per side that
learns in the step (`train_side`); each group's opponent is drawn from a league (the other side now, its
snapshots, the frozen base, scripted players). The run ends with a cross-play table.

Deliberate choices:
- No KL by default (the paper): kl_coef=0 runs no reference forward at all. With kl_coef>0: k3 estimator
  against the same model with the adapter disabled, aggregated like the loss. train.kl_before_last_round < 1
  weighs it less on the replies before round rollout.max_rounds (kl_round_weights; the CPU default: 0.05).
- Groups never straddle ranks: a rank plays whole groups, so advantages need no communication.
- The engine's log-probs are not used as "old" log-probs: the trainer recomputes them (same kernels and mode as
  the update, so the first update's ratio is exactly 1). The engine-vs-trainer difference is logged every step
  and, with train.tis_cap>0, corrected by truncated importance sampling (weight min(p_trainer / p_engine, cap)),
  folded into per-token advantages.
- train.updates_per_batch>1 cuts the step's episodes into that many parts, one optimiser update each, all
  against the same old log-probs: later parts are off-policy and the clip matters.
- Data parallel by hand instead of a DDP wrapper: rank 0's initial LoRA weights are broadcast, and after the
  backward passes one all_reduce sums the flat LoRA gradient. It is DDP's arithmetic, visible here, and works
  with any number of micro-batches per rank. Every checkpoint checks that the replicas are still identical.
- train.sharding=fsdp2 (the 30B plan, memory_plan.py): FSDP2 shards the bf16 base, the LoRA weights and AdamW
  over the ranks, one unit per decoder layer. Its reduce-scatter SUMS the gradients (divide factor 1), the same
  arithmetic as the manual all-reduce, so the loss normalisation is identical: each micro-batch's loss is
  weighted by its share of the whole step over all ranks (e.g. buyer tokens / all buyer tokens). Every forward
  and backward gathers weights from all ranks, so ranks with fewer micro-batches run empty ones. The adapter is
  gathered into full tensors for checkpoints (standard peft folder) and for the vLLM sync; the AdamW state is
  gathered into trainer.pt on rank 0. With engine.kind=hf every rank gathers the whole model for the rollouts
  (its generation runs a different number of forwards per rank): fine for small models, not for the 30B.
- engine.tensor_parallel_size > 1 (vLLM): each group of that many ranks is one engine; its ranks OR "still
  playing" over the group every round (env.play's any_pending), so that all of them call generate as often.
- Rollout sampling seeds depend only on (seed, step, rank), and each step's products only on (seed, step):
  a resumed run replays exactly what the uninterrupted run would have done.
- A NaN/inf loss or gradient skips the update (weights and Adam moments untouched) and is logged;
  train.max_bad_updates in a row stop the run. Checkpoints are written to a .tmp folder and renamed, and never
  from non-finite weights.
- SIGTERM/SIGINT: during rollouts the step is abandoned (weights untouched) and the state before it saved;
  during the update the step is finished and saved; the exit code is 128 + the signal. A second signal kills.
  Under torchrun, signal torchrun (it forwards to every rank), not one rank.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import data
import env
import league
import reward
from config import ConfigError, load_config, save_config
from engine import active_adapter
from vllm_engine import full_tensor


# ---------------------------------------------------------------------------------------------------------------
# The GRPO math: pure functions, never writing into their inputs.


def group_advantages(rewards, group_size: int, scale: str = "none") -> torch.Tensor:
    """A_i = r_i - mean(r of its group); scale="std" also divides by (std + 1e-4), torch's unbiased std.
    Groups are consecutive blocks of group_size. rewards [N] -> advantages [N], float32."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.ndim != 1 or group_size < 1 or r.numel() % group_size:
        raise ValueError(f"need a 1-D reward vector whose length {tuple(r.shape)} is a multiple of group_size={group_size}")
    if scale not in ("none", "std"):
        raise ValueError(f"scale={scale!r}: use 'none' or 'std'")
    groups = r.reshape(-1, group_size)                          # [N/G, G]
    adv = groups - groups.mean(dim=1, keepdim=True)             # [N/G, G]
    if scale == "std":
        adv = adv / (groups.std(dim=1, keepdim=True) + 1e-4)   # [N/G, G]
    return adv.reshape(-1)                                      # [N]


def policy_loss(logp, old_logp, advantages, mask, eps_low: float = 0.2, eps_high: float = 0.28, agg: str = "token",
                max_tokens: int | None = None) -> torch.Tensor:
    """The clipped surrogate. logp, old_logp, mask: [B, T]; advantages: [B] (one per sequence, broadcast over its
    tokens) or [B, T] (per token, e.g. with importance weights folded in). Returns a scalar.

    l_t = -min(ratio_t * A, clamp(ratio_t, 1 - eps_low, 1 + eps_high) * A),  ratio_t = exp(logp_t - old_logp_t)
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages     # [B, 1] or [B, T]
    ratio = torch.exp(logp - old_logp)                                    # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)               # [B, T]
    per_token = -torch.minimum(ratio * adv, clipped * adv)                # [B, T]
    return aggregate(per_token, mask, agg, max_tokens)


def aggregate(per_token, mask, agg: str = "token", max_tokens: int | None = None) -> torch.Tensor:
    """Masked reduction of a per-token loss [B, T] to a scalar:
    token: sum(l*m) / sum(m) over the batch (DAPO) | seq: mean over sequences of sum_t(l*m) / sum_t(m) (GRPO)
    | dr_grpo: sum(l*m) / (B * max_tokens) (Dr. GRPO). A sequence or batch without masked tokens contributes 0."""
    m = mask.to(per_token.dtype)                                          # [B, T]
    masked = torch.where(m > 0, per_token, torch.zeros_like(per_token))   # [B, T]; masked-out values never leak
    if agg == "token":
        return masked.sum() / m.sum().clamp(min=1)
    if agg == "seq":
        return (masked.sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()   # [B] -> scalar
    if agg == "dr_grpo":
        if not max_tokens:
            raise ValueError("agg='dr_grpo' needs max_tokens (the constant per-sequence denominator)")
        return masked.sum() / (m.shape[0] * max_tokens)
    raise ValueError(f"agg={agg!r}: use 'token', 'seq' or 'dr_grpo'")


def kl_k3(logp, ref_logp) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 >= 0. [B, T]."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def reply_index(mask: list[int]) -> list[int]:
    """For each position of a conversation, the index of the generated reply it belongs to (its run of
    consecutive 1s in the mask: 0 for the player's first reply, so the round for a buyer, who speaks first), -1
    on every id it did not generate. [1, 1, 0, 1] -> [0, 0, -1, 1]."""
    out, k, previous = [], -1, 0
    for m in mask:
        k += m and not previous
        out.append(k if m else -1)
        previous = m
    return out


def kl_round_weights(reply, last_round: int, before_last: float) -> torch.Tensor:
    """The KL's weight per token: 1 on the replies of round rollout.max_rounds (reply index last_round), before_last on
    every earlier one; a game that ended sooner (a deal, a quit) has only earlier ones. Why it was tried (issue 12):
    against every seller measured, the best fixed schedules open alike (a,a,a,a) and differ only in the last bid, so a
    lighter KL before the last round should let the opening move and hold the last bid. Measured (README, "The KL by
    round", "The last round's KL"): with the last round's KL at 0.0125-0.02 the last bid still drifted to h on one seed
    of three; at 0.032-0.04 with 0.0016 before it every unseen seller held on every seed (0.032: configs/cpu.yaml).
    reply [B, T] (long) -> [B, T] (float32)."""
    return torch.where(reply == last_round, 1.0, before_last).to(torch.float32)


def tis_weights(old_logp, engine_logp, cap: float) -> torch.Tensor:
    """Truncated importance weight of each sampled token: min(p_trainer / p_engine, cap), no gradient. [B, T]."""
    return torch.exp(old_logp - engine_logp).clamp(max=cap).detach()


# ---------------------------------------------------------------------------------------------------------------
# From episodes to tensors: micro-batches packed by token budget, log-probs under the sampling temperature.


@dataclass
class MicroBatch:
    rows: list[int]              # indices of the episodes in this micro-batch (into the rank's episode list)
    ids: torch.Tensor            # [B, T] the buyer's conversation token ids, right-padded
    attn: torch.Tensor           # [B, T] 1 on real tokens, 0 on padding
    mask: torch.Tensor           # [B, T-1] 1 where the predicted token ids[:, t+1] was generated by the buyer
    engine_logp: torch.Tensor    # [B, T-1] the engine's log-prob of each predicted token (0 off the mask)
    reply: torch.Tensor          # [B, T-1] which of the player's replies the predicted token is in (-1 off the mask)


def pack_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices sorted longest first, cut into runs whose rows x longest row <= max_tokens (a longer sequence
    gets a micro-batch of its own). Sorting keeps padding minimal: neighbours have similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:  # current[0] is the longest
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def right_pad(rows: list[list], width: int, value, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=dtype)
    return out


def micro_batches(convs: list[env.Conversation], rows: list[int], max_tokens: int, pad_id: int, device) -> list[MicroBatch]:
    """The episodes `rows` as padded tensors. The loss mask is Conversation.mask shifted by one: the logits at
    position t predict token t+1, so position t is trained exactly when token t+1 was generated by the buyer."""
    out = []
    for chunk in pack_by_tokens([len(convs[i].ids) for i in rows], max_tokens):
        members = [rows[j] for j in chunk]
        width = max(len(convs[i].ids) for i in members)
        ids = right_pad([convs[i].ids for i in members], width, pad_id, torch.long)
        attn = right_pad([[1] * len(convs[i].ids) for i in members], width, 0, torch.long)
        mask = right_pad([convs[i].mask[1:] for i in members], width - 1, 0, torch.float32)
        engine_logp = right_pad([convs[i].logprobs[1:] for i in members], width - 1, 0.0, torch.float32)
        reply = right_pad([reply_index(convs[i].mask)[1:] for i in members], width - 1, -1, torch.long)
        out.append(MicroBatch(members, ids.to(device), attn.to(device), mask.to(device), engine_logp.to(device),
                              reply.to(device)))
    return out


@contextmanager
def head_only_at(model, keep):
    """While active, the model's LM head sees only the positions keep [B, T-1] (bool) of its input: [B, T, H] ->
    [n, H], so the logits are [n, V]. Why: only the buyer's generated tokens are scored (about 30% of a sequence),
    and the head over Qwen's 151,936 words costs per token what 5 to 10 decoder layers do (Qwen3-0.6B: 156M
    multiply-adds against 16M per layer), its fp32 logits being the largest activation; the whole update ran 1.5x
    to 1.6x faster on CPU (bench/README.md). A hook on the head, not the decoder and head called by hand: the
    model's own forward runs, so FSDP2's root unit (which holds the head) still gathers and frees its weights."""
    def select(head, args):
        hidden = args[0]                                                                        # [B, T, H]
        if hidden.shape[:2] != (keep.shape[0], keep.shape[1] + 1):
            raise ValueError(f"head_only_at: the LM head got {tuple(hidden.shape)}, not the whole [B, T, H] "
                             f"sequence for keep {tuple(keep.shape)}: call the model with logits_to_keep=0")
        return (hidden[:, :-1][keep],) + args[1:]                                              # [n, H]
    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def token_logprobs(model, ids, attn, temperature: float, with_entropy: bool = False, only=None):
    """log p(ids[:, t+1] | ids[:, :t+1]) under softmax(logits / temperature), the distribution the engine sampled
    from. ids, attn [B, T] -> logp [B, T-1] (float32), and the entropy [B, T-1] of that distribution if asked.
    only [B, T-1] (e.g. the loss mask): compute both only where it is nonzero (head_only_at), 0 elsewhere."""
    keep = None if only is None else only > 0                                                   # [B, T-1]
    with nullcontext() if keep is None else head_only_at(model, keep):
        logits = model(input_ids=ids, attention_mask=attn).logits                  # [B, T, V] or [n, V]
    if keep is None:
        logits, targets = logits[:, :-1], ids[:, 1:]                                            # [B, T-1, V]
    else:
        targets = ids[:, 1:][keep]                                                              # [n]
    logits = logits.float() / temperature
    lse = torch.logsumexp(logits, dim=-1)                                                       # [B, T-1] or [n]
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    if keep is not None:  # [n] -> [B, T-1], 0 at the positions not computed
        logp = torch.zeros(keep.shape, device=logp.device).masked_scatter(keep, logp)
        if entropy is not None:
            entropy = torch.zeros(keep.shape, device=entropy.device).masked_scatter(keep, entropy)
    return logp, entropy


def rows_of(values: list[torch.Tensor], rows: list[int], width: int, device) -> torch.Tensor:
    """Per-episode 1-D tensors (e.g. old log-probs) of `rows`, right-padded with 0 to [B, width]."""
    out = torch.zeros(len(rows), width)
    for j, i in enumerate(rows):
        out[j, :len(values[i])] = values[i]
    return out.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Ranks, seeds, data order


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on `t`, which the caller owns); identity with one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def any_rank(flag: bool, device, group=None) -> bool:
    """`flag` ORed over all ranks (or over the ranks of `group`)."""
    return bool(all_max(torch.tensor([float(flag)], device=device), group).item())


def engine_any_pending(engine, device):
    """env.play's any_pending for a tensor-parallel vLLM engine: "still playing" ORed over the ranks of its group,
    so that every one of them calls generate equally often. None for an engine of one rank."""
    group = getattr(engine, "tp_group", None)
    return None if group is None else (lambda flag: any_rank(flag, device, group))


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rollout_seed(seed: int, step: int, rank_: int) -> int:
    """The sampling seed of one rank's rollouts at one step; players add their call count (< 100 per step)."""
    return ((seed * 1_000_003 + step) * 1_009 + rank_) * 1_000 % 2**62


def step_products(train: list[data.Scenario], step: int, n: int, seed: int) -> list[data.Scenario]:
    """The n products of a step: consecutive positions step*n .. step*n+n-1 in an endless sequence of epochs,
    each epoch a fresh permutation of the train split seeded by (seed, epoch). A pure function of the step, so
    the data position is restored by the step number alone."""
    out = []
    for pos in range(step * n, step * n + n):
        epoch, i = divmod(pos, len(train))
        order = list(range(len(train)))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        out.append(train[order[i]])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sharding (train.sharding=fsdp2): FSDP2 instead of identical replicas


def shard(model):
    """FSDP2 over all ranks, one unit per decoder layer (memory_plan.shard_with_fsdp2). The gradients are
    reduce-scattered as a plain SUM (divide factor 1, no pre-scaling: gloo has no PREMUL_SUM), the arithmetic of
    the manual all-reduce: each rank's loss is already weighted by its share of the global batch."""
    import memory_plan
    memory_plan.shard_with_fsdp2(model)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return model


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model) -> bool:
    return bool(fsdp_modules(model))


@contextmanager
def full_weights(model):
    """Every rank gathers the whole model (one all-gather per FSDP unit) and keeps it until the block ends, so
    that forward passes run without collectives: the HF engine's generation makes a different number of them on
    each rank. Each rank then holds the full weights, as without sharding: fine for small models and tests, not
    for the 30B (use engine.kind=vllm there)."""
    modules = fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:  # back to FSDP2's defaults: layers free their weights after forward, the root keeps its
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


def generation_weights(cfg, model):
    """The context rollouts and evaluations run in: the gathered model for the HF engine on a sharded trainer."""
    return full_weights(model) if cfg.engine.kind == "hf" and is_sharded(model) else nullcontext()


def padded_for_all_ranks(batches: list[MicroBatch], model, pad_id: int, device) -> list[MicroBatch]:
    """Under FSDP2 every forward and backward gathers each layer's weights from all ranks, so every rank runs as
    many micro-batches: shorter lists get empty ones (no rows, one padding token pair, mask 0). Unchanged
    without sharding."""
    if not is_sharded(model):
        return batches
    n = int(all_max(torch.tensor([len(batches)], device=device)).item())
    ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
    zeros = torch.zeros(1, 1, device=device)
    empty = MicroBatch([], ids, torch.ones_like(ids), zeros, zeros, torch.full((1, 1), -1, device=device))
    return batches + [empty] * (n - len(batches))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: step_NNNNNN/{adapter/, trainer.pt, config.yaml}, written to a .tmp folder then renamed.


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(out_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first. A .tmp folder (a save cut short) is never one."""
    return sorted(p for p in Path(out_dir).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "trainer.pt").exists())


def lr_factor(update: int, t, total: int | None = None) -> float:
    """The learning rate of optimiser update `update` (0-based) as a fraction of train.lr: a linear warm-up,
    then constant or a cosine down to min_lr_ratio at the side's last update (`total` updates; default: one
    side learning every step)."""
    if update < t.warmup_updates:
        return (update + 1) / t.warmup_updates
    if t.lr_schedule == "constant":
        return 1.0
    total = total or t.steps * t.updates_per_batch
    progress = min(1.0, (update - t.warmup_updates) / max(1, total - 1 - t.warmup_updates))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(cfg, model, sides: dict, step: int) -> Path | None:
    """Collective (every rank gathers the adapter and passes its RNG state; FSDP2 gathers AdamW); rank 0 writes.
    adapter/ is the buyer's (a standard peft folder); with self-play, seller_adapter/ the seller's."""
    from safetensors.torch import save_file
    from vllm_engine import adapter_state_dict

    buyer = sides["buyer"]
    rngs = gather_objects(rng_state())
    adapter = adapter_state_dict(model)  # peft's names, full tensors on every rank (all-gathered under FSDP2)
    optim = optimizer_state(model, buyer.optimizer)
    seller = sides.get("seller")
    seller_adapter = adapter_state_dict(model, adapter=seller.adapter) if seller else None
    checksums = gather_objects(sum(v.double().sum().item() for v in adapter.values()))
    if len(set(checksums)) > 1:  # the gradient sync keeps replicas identical; if not, no checkpoint can be right
        raise RuntimeError(f"ranks hold different LoRA weights at step {step} (checksums {checksums})")
    # (Under FSDP2 the ranks hold different shards by design; the check then compares the gathered adapters.)
    if rank() != 0:
        return None
    if not all(torch.isfinite(v).all() for v in adapter.values()):
        raise RuntimeError(f"refusing to checkpoint step {step}: the LoRA weights hold NaN/inf")
    final = Path(cfg.out_dir) / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapter").mkdir(parents=True)  # standard peft folder: PeftModel.from_pretrained / vLLM LoRA
    save_file(adapter, tmp / "adapter" / "adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(str(tmp / "adapter"))
    extra = {}
    if seller:  # self-play: the seller's adapter (a peft folder too) and its optimiser
        (tmp / "seller_adapter").mkdir()
        save_file(seller_adapter, tmp / "seller_adapter" / "adapter_model.safetensors")
        model.peft_config[seller.adapter].save_pretrained(str(tmp / "seller_adapter"))
        extra = {"seller_optimizer": seller.optimizer.state_dict(), "seller_scheduler": seller.scheduler.state_dict(),
                 "seller_bad_updates": seller.bad_updates}
    torch.save({"step": step, "data_position": step * cfg.rollout.products_per_step, "world_size": world(),
                "sharded": is_sharded(model), "bad_updates": buyer.bad_updates, "optimizer": optim,
                "scheduler": buyer.scheduler.state_dict(), "rng": rngs, **extra}, tmp / "trainer.pt")
    save_config(cfg, tmp / "config.yaml")
    if final.exists():  # the same step saved again (a stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(cfg.out_dir)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    if (Path(cfg.out_dir) / "metrics.jsonl").exists():  # the curves a user looks at first, kept current
        import report
        report.save_training_png(cfg.out_dir)
    return final


def find_resume_checkpoint(cfg) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        found = checkpoint_dirs(cfg.out_dir)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / "trainer.pt").exists():
        raise SystemExit(f"resume={cfg.resume}: no trainer.pt there; use auto, never, or a step_NNNNNN folder")
    return path


def load_checkpoint(path: Path, model, sides: dict) -> dict:
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if state["world_size"] != world():
        raise SystemExit(f"{path} was written by {state['world_size']} rank(s), this run has {world()}: resume with "
                         f"torchrun --nproc_per_node {state['world_size']} (the per-rank RNG and data shares differ)")
    if state.get("sharded", False) != is_sharded(model):
        was = "fsdp2" if state.get("sharded") else "none"
        raise SystemExit(f"{path} was written with train.sharding={was} (its AdamW state is stored that way): "
                         f"resume with train.sharding={was}")
    buyer, seller = sides["buyer"], sides.get("seller")
    if seller and not (path / "seller_adapter").exists():
        raise SystemExit(f"{path} has no seller_adapter/: it was written by a single-sided run; self-play starts "
                         f"its seller from the base (resume=never, or a new out_dir)")
    load_adapter(model, path / "adapter")
    load_optimizer_state(model, buyer.optimizer, state["optimizer"])
    buyer.scheduler.load_state_dict(state["scheduler"])
    buyer.bad_updates = state["bad_updates"]
    if seller:
        load_adapter(model, path / "seller_adapter", seller.adapter)
        seller.optimizer.load_state_dict(state["seller_optimizer"])
        seller.scheduler.load_state_dict(state["seller_scheduler"])
        seller.bad_updates = state["seller_bad_updates"]
    set_rng_state(state["rng"][rank()])
    return state


def load_adapter(model, folder: Path, adapter: str = "default") -> None:
    """A peft adapter folder into the LoRA weights of `adapter`, every one of them, also when FSDP2 shards them
    (each rank keeps its slice of the full tensor)."""
    from peft.utils import load_peft_weights
    from torch.distributed.tensor import DTensor, distribute_tensor

    saved = load_peft_weights(str(folder), device="cpu")  # peft's names: the model's, without the adapter name
    params = {name.replace(f".{adapter}", ""): p for name, p in model.named_parameters()
              if f".{adapter}." in name and "lora_" in name}
    if saved.keys() != params.keys():
        extra, missing = sorted(saved.keys() - params.keys())[:3], sorted(params.keys() - saved.keys())[:3]
        raise SystemExit(f"{folder} does not fit this model's LoRA weights (in the folder only: {extra}; "
                         f"missing: {missing})")
    with torch.no_grad():
        for key, p in params.items():
            full = saved[key].to(p.device, p.dtype)
            if isinstance(p, DTensor):  # every rank has the full tensor: slice locally, no communication
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(full)


def optimizer_state(model, optimizer) -> dict:
    """AdamW's state for trainer.pt: optimizer.state_dict() without sharding; under FSDP2 gathered into full
    tensors (keyed by parameter name) on rank 0, a collective."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    # Every rank read the full state from trainer.pt and keeps its shard of it.
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def prepare_run_dir(cfg) -> None:
    """Create out_dir and save the resolved config. resume=never means start over: the checkpoints, logs and
    evaluations of an earlier run there are removed (said on the console), so none can be mixed into this one."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume == "never":
        old = sorted(out.glob("step_*")) + [p for p in out.iterdir() if p.name.startswith(("metrics.", "transcripts.",
                                                                                          "eval_", "final_eval."))]
        if old:
            print(f"resume=never: removing {len(old)} files/folders of an earlier run in {out}", flush=True)
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    save_config(cfg, out / "config.yaml")


def drop_lines_after(path: Path, step: int) -> None:
    """On resume, forget log lines of steps after the checkpoint (a run killed between log and save)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and _line_step(ln) <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _line_step(line: str) -> int:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return 10**9  # a line cut by a kill: dropped


# ---------------------------------------------------------------------------------------------------------------
# Building the pieces the config names


def build_engine(cfg, model, tokenizer):
    if cfg.engine.kind == "hf":
        from engine import HFEngine
        return HFEngine(model, tokenizer, max_batch_tokens=cfg.engine.max_batch_tokens,
                        merged_copies=cfg.engine.merged_copies)
    from vllm_engine import VLLMEngine
    e = cfg.engine
    seller = None
    if e.sync_strategy == "merged" and cfg.seller.kind == "llm":
        # A merged engine holds the policy, not the base: the frozen base (seller, starting policy) is served by
        # the HF engine over the trainer's own model with the adapter off. No second copy of the weights; config
        # validation allows it only unsharded (a tiny model, where this costs nothing).
        from engine import HFEngine
        seller = HFEngine(model, tokenizer, max_batch_tokens=e.max_batch_tokens, merged_copies=e.merged_copies)
    sp = cfg.selfplay   # self-play serves both sides' adapters and each side's snapshots
    loras = 1 if sp.mode == "off" else 2 + 2 * sp.max_snapshots
    return VLLMEngine(cfg.model.name, tokenizer, sync_strategy=e.sync_strategy, dtype=cfg.model.dtype, seller=seller,
                      max_loras=loras,
                      gpu_memory_utilization=e.gpu_memory_utilization, max_model_len=e.max_model_len,
                      max_lora_rank=cfg.model.lora_r, max_num_seqs=e.max_num_seqs, seed=cfg.seed,
                      quantization=e.quantization or None, enforce_eager=e.enforce_eager,
                      tensor_parallel_size=e.tensor_parallel_size)


def build_seller(cfg, engine, endpoint, seed: int, group_size: int = 1):
    """group_size: in training G, so that a scripted seller's random type is the same for the G episodes of a group
    (their advantages then measure the buyer's choices, not which seller it drew); in evaluation 1."""
    s, r = cfg.seller, cfg.rollout
    persona = env.load_persona(s.persona) if s.persona and s.kind != "scripted" else ""
    if s.kind == "scripted":
        return env.ScriptedSeller(s.strategy, jitter=s.jitter, seed=seed, group_size=group_size,
                                  style="ladder" if r.style == "ladder" else "")
    if s.kind == "chat":
        return env.ChatPlayer(endpoint, "seller", temperature=s.temperature, max_tokens=s.max_tokens, persona=persona,
                              description_chars=r.description_chars)
    import warmstart   # a warm start taught with per-game plans needs its seller briefed (env.SELLER_PLAN)
    briefs = warmstart.seller_briefs(cfg.model.name, seed, group_size) if r.style == "ladder" else None
    return env.LLMPlayer(engine, "seller", temperature=s.temperature, max_tokens=s.max_tokens, adapter=False,
                         persona=persona, style=r.style, description_chars=r.description_chars,
                         max_context=r.max_context, seed=seed, briefs=briefs)


def build_buyer(cfg, engine, seed: int, temperature: float | None = None):
    import warmstart   # a warm start taught on the graded view is shown it here too (env.ASK_HIGH)
    r = cfg.rollout
    return env.LLMPlayer(engine, "buyer", r.buyer_temperature if temperature is None else temperature,
                         r.buyer_max_tokens, adapter=True, style=r.style, description_chars=r.description_chars,
                         max_context=r.max_context, seed=seed,
                         graded_view=r.style == "ladder" and warmstart.graded_view(cfg.model.name))


def league_players(cfg, engine, pairings: list[dict], seed: int):
    """Self-play's (buyer, seller) for one step: per role an env.Mixture over the distinct players the groups'
    pairings name (league.py), each group played by its own."""
    players = []
    for role in league.ROLES:
        keys = sorted({p[role] for p in pairings})
        members = [league_player(cfg, engine, role, key, seed + 500 * (role == "seller") + 1000 * j)
                   for j, key in enumerate(keys)]
        players.append(env.Mixture(members, [keys.index(p[role]) for p in pairings], cfg.rollout.group_size))
    return tuple(players)


def league_player(cfg, engine, role: str, key: str, seed: int, group_size: int | None = None):
    """One league member: "learner"/"current" (the side's adapter), "base" (adapter off), "scripted", or a
    snapshot's adapter name. group_size: episodes that share a scripted seller's draw (training: G)."""
    G, ladder = group_size or cfg.rollout.group_size, cfg.rollout.style == "ladder"
    if key == "scripted" and role == "seller":
        import warmstart
        return (warmstart.seller_family(seed, G, warmstart.family_of(cfg.model.name)) if ladder else
                env.ScriptedSeller(cfg.seller.strategy, jitter=cfg.seller.jitter, seed=seed, group_size=G))
    if key == "scripted":
        return env.scripted_buyer(cfg.rollout.style, seed=seed)
    player = build_buyer(cfg, engine, seed) if role == "buyer" else build_seller(cfg, engine, None, seed, G)
    own = True if role == "buyer" else league.ADAPTERS["seller"]   # the buyer's adapter is the active one
    player.adapter = {"learner": own, "current": own, "base": False}.get(key, key)
    return player


def selfplay_metrics(games, pairings: list[dict], seller: Side) -> dict:
    """The seller's reward over all of the step's episodes (rank 0's view of every rank), and the share of groups
    each kind of opponent played, per role."""
    scores = seller.rewards(games).tolist()
    everything = [x for part in gather_objects(scores) for x in part]
    pairs = [p for part in gather_objects(pairings) for p in part]
    kind = lambda key: key.split("@")[0] if "@" in key else key  # noqa: E731  (a snapshot: its role)
    shares = {}
    for role in league.ROLES:
        for p in pairs:
            name = f"league/{role}_{'snapshot' if '@' in p[role] else kind(p[role])}"
            shares[name] = shares.get(name, 0.0) + 1 / len(pairs)
    return {"seller/reward": sum(everything) / max(1, len(everything))} | shares


def freshness_probe(tokenizer, scenario, style: str):
    """A fixed prompt + reply the vLLM engine and the trainer both score after every sync (vllm_engine)."""
    from vllm_engine import FreshnessProbe
    fmt = env.ChatFormat(tokenizer)
    prompt = fmt.opening(env.buyer_opening(scenario, style))
    reply = fmt.encode(f"Thought: Start low.\nTalk: Would you take ${scenario.budget * 0.6:,.2f}?\n"
                       f"Action: [BUY] ${scenario.budget * 0.6:,.2f} (1x {scenario.codename})") + [fmt.eos_id]
    return FreshnessProbe(prompt + reply, prompt_len=len(prompt))


class Loggers:
    """metrics.jsonl, transcripts.jsonl and, when enabled, TensorBoard / W&B. Rank 0 only."""

    def __init__(self, cfg, resumed_step: int):
        self.dir = Path(cfg.out_dir)
        self.tb = self.wandb = None
        if rank() != 0:
            return
        for name in ("metrics.jsonl", "transcripts.jsonl"):
            drop_lines_after(self.dir / name, resumed_step)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("log.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                                 "or set log.tensorboard=false") from None
            self.tb = SummaryWriter(str(self.dir / "tb"))
        if cfg.log.wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit("log.wandb_project is set but wandb is not installed: pip install wandb, or set "
                                 "log.wandb_project=''") from None
            self.wandb = wandb.init(project=cfg.log.wandb_project, config=asdict(cfg), dir=str(self.dir),
                                    resume="allow", id=self.dir.resolve().name)

    def log(self, metrics: dict, transcripts: list[dict]) -> None:
        if rank() != 0:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        with open(self.dir / "transcripts.jsonl", "a") as f:
            for t in transcripts:
                f.write(json.dumps(t) + "\n")
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=metrics["step"])


def episode_stats(outcome: env.Outcome) -> reward.EpisodeStats:
    return reward.EpisodeStats(outcome.reward, outcome.reason, outcome.price, outcome.budget, outcome.cost,
                               outcome.list_price, outcome.rounds, outcome.interventions, outcome.first_offer,
                               outcome.overshoot, outcome.category, outcome.seller_replies, outcome.seller_errors)


def peak_memory_gib(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (whole process)


# ---------------------------------------------------------------------------------------------------------------
# One step's parts: rollouts, scoring, updates


@dataclass
class Side:
    """One learning side of the game, as data: the loop trains each side that learns this step the same way.
    A single-sided run has one, the buyer; self-play (league.py) adds the seller, a second adapter on the base."""
    role: str                  # "buyer" | "seller": whose generated tokens (Game.state[role]) it trains on
    adapter: str               # its peft adapter: "default" (the buyer's, as in every checkpoint) | "seller"
    params: list               # its LoRA tensors: the only ones its optimiser steps
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    temperature: float         # its sampling temperature: the trainer's log-probs are taken at it
    max_tokens: int            # its reply cap (dr_grpo's per-sequence denominator)
    penalty: float = -1.0      # the seller's reward for an episode the regulation overruled it in
    bad_updates: int = 0       # consecutive skipped (non-finite) updates

    def rewards(self, games: list) -> torch.Tensor:
        """The verifiable reward of each game for this side (reward.py): the buyer's score, or the seller's."""
        if self.role == "buyer":
            return torch.tensor([g.outcome.reward for g in games])
        return torch.tensor([reward.seller_score(g.outcome.budget, g.outcome.cost, g.outcome.price,
                                                 g.outcome.interventions, self.penalty) for g in games])


def make_side(cfg, model, role: str, params: list) -> Side:
    t, sp = cfg.train, cfg.selfplay
    lr = sp.seller_lr if role == "seller" and sp.seller_lr > 0 else t.lr
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    learns = sum(role in league.learning_roles(sp.mode, k, sp.switch_every) for k in range(t.steps))
    total = max(1, learns * t.updates_per_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, t, total))
    if role == "buyer":
        return Side("buyer", league.ADAPTERS["buyer"], params, optimizer, scheduler, cfg.rollout.buyer_temperature,
                    cfg.rollout.buyer_max_tokens)
    return Side("seller", league.ADAPTERS["seller"], params, optimizer, scheduler, cfg.seller.temperature,
                cfg.seller.max_tokens, penalty=sp.intervention_penalty)


def train_side(model, side: Side, games: list, rows: list[int], adv, cfg, pad_id, device, step: int):
    """Step 3 for one side: its old log-probs and optimiser updates on `rows` (the games it played as the learner),
    with the advantages `adv` of all of this rank's games [n_local]. Returns (stats, maxes, grad norms, skipped
    updates)."""
    t = cfg.train
    convs = [g.state.get(side.role) for g in games]  # token ids + its mask + engine log-probs, as generated
    rows = [i for i in rows if isinstance(convs[i], env.Conversation)]  # (a seller the buyer never let speak)
    stats, grad_norms, skipped = {}, [], 0
    maxes = {"logp_diff_abs_max": 0.0, "ratio_max": 0.0, "inv_ratio_max": 0.0}  # same keys on every rank
    # The buyer's adapter is the active one everywhere; the seller's is switched in for its update only.
    active = nullcontext() if side.adapter == model.active_adapter else active_adapter(model, side.adapter)
    with active:
        # One update per batch: the old log-probs are the update's own forward's, detached, the same numbers a
        # separate scoring pass gives (same weights, same mode, same micro-batches), at one forward less; the
        # KL's reference forward (no gradient) then runs inside the update too.
        one_pass = t.updates_per_batch == 1
        old, ref = (None, None) if one_pass else score_rollouts(model, side, convs, cfg, pad_id, device, stats, maxes)
        for k in range(t.updates_per_batch):  # consecutive parts of `rows`; all use the same old log-probs
            part = rows[k * len(rows) // t.updates_per_batch:(k + 1) * len(rows) // t.updates_per_batch]
            grad_norm, skip = update(model, side, convs, part, adv, old, ref, cfg, pad_id, device, stats, maxes)
            grad_norms.append(grad_norm)
            skipped += skip
            side.bad_updates = side.bad_updates + 1 if skip else 0
            if side.bad_updates >= t.max_bad_updates:
                raise SystemExit(f"train.py: stopping at step {step + 1}: {side.bad_updates} {side.role} updates in a "
                                 f"row had a NaN/inf loss or gradient (grad norm {grad_norm}); the weights are still "
                                 f"those of the last good update and nothing was saved from this state. Lower "
                                 f"train.lr or train.grad_clip, or read the episodes in transcripts.jsonl.")
    return stats, maxes, grad_norms, skipped


class Abandon(Exception):
    """A stop signal arrived during rollouts: drop the step (weights are untouched)."""


STOP = {"signal": None}


def on_signal(signum, frame) -> None:
    STOP["signal"] = signum
    signal.signal(signum, signal.SIG_DFL)  # a second signal kills at once
    print(f"\nrank {rank()}: got signal {signum}; stopping cleanly at the next safe point (send it again to kill)",
          file=sys.stderr, flush=True)


def abandon_if_stopping(any_pending=None):
    """env.play's on_round: raise Abandon once a stop signal arrived. Ranks that share a tensor-parallel engine
    decide together (any_pending ORs over them), so that none is left waiting in generate."""
    def on_round(games) -> None:
        stopping = STOP["signal"] is not None
        if any_pending(stopping) if any_pending is not None else stopping:
            raise Abandon()
    return on_round


def reduce_stats(sums: dict, maxes: dict, device) -> tuple[dict, dict]:
    """Sum `sums` and take the max of `maxes` over ranks (two collectives); values as Python floats."""
    def reduce(d, fn):
        keys = sorted(d)
        t = fn(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=device)).cpu().tolist()
        return dict(zip(keys, t))
    return reduce(sums, all_sum), reduce(maxes, all_max)


def add(into: dict, **values) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + float(v)


def add_score_stats(stats: dict, maxes: dict, mb, logp, entropy) -> None:
    """Entropy and engine-vs-trainer log-prob gaps over one micro-batch's buyer tokens."""
    with torch.no_grad():
        m = mb.mask > 0
        diff = (mb.engine_logp - logp)[m]                                                      # [n_tokens]
        add(stats, buyer_tokens=m.sum(), entropy=entropy[m].sum(), logp_diff_abs=diff.abs().sum(),
            logp_diff=diff.sum())
        maxes["logp_diff_abs_max"] = max(maxes.get("logp_diff_abs_max", 0.0),
                                         diff.abs().max().item() if m.any() else 0.0)


@torch.no_grad()
def reference_logprobs(model, mb, temperature: float) -> torch.Tensor:
    """The KL's reference: the frozen base model (the same weights with the adapter off) at the buyer's tokens."""
    with model.disable_adapter():
        return token_logprobs(model, mb.ids, mb.attn, temperature, only=mb.mask)[0]               # [B, T-1]


@torch.no_grad()
def score_rollouts(model, side, convs, cfg, pad_id, device, stats: dict, maxes: dict):
    """The side's current log-probs of every token it generated before any update ("old"), and the reference's
    when a KL is used; adds entropy and engine-vs-trainer statistics over those tokens to stats / maxes."""
    t, temperature = cfg.train, side.temperature
    old, ref = [None] * len(convs), [None] * len(convs)
    model.train()  # the mode of the update's forward, so that the first update's ratio is exactly 1
    batches = micro_batches(convs, list(range(len(convs))), t.micro_batch_tokens, pad_id, device)
    for mb in padded_for_all_ranks(batches, model, pad_id, device):  # (an empty one adds nothing below)
        logp, entropy = token_logprobs(model, mb.ids, mb.attn, temperature, True, only=mb.mask)  # [B, T-1]
        if t.kl_coef > 0:
            ref_logp = reference_logprobs(model, mb, temperature)                                # [B, T-1]
        add_score_stats(stats, maxes, mb, logp, entropy)
        for j, i in enumerate(mb.rows):
            n = len(convs[i].ids) - 1
            old[i] = logp[j, :n].cpu()
            if t.kl_coef > 0:
                ref[i] = ref_logp[j, :n].cpu()
    return old, (ref if t.kl_coef > 0 else None)


def update(model, side, convs, rows, adv, old, ref, cfg, pad_id, device, stats, maxes):
    """One optimiser update of `side` on the episodes `rows` (this rank's part of the batch); adds loss, clip,
    ratio, KL and importance-weight statistics to stats / maxes. Returns (grad norm, skipped). Every rank calls it
    the same number of times (it holds the gradient all-reduce)."""
    t, temperature = cfg.train, side.temperature
    params, optimizer, scheduler = side.params, side.optimizer, side.scheduler
    max_tokens = t.dr_grpo_max_tokens or side.max_tokens * cfg.rollout.max_rounds
    batches = micro_batches(convs, rows, t.micro_batch_tokens, pad_id, device)
    # Each micro-batch's loss is weighted by its share of the global batch (tokens for "token", sequences for
    # "seq"/"dr_grpo"), so the gradient summed over micro-batches and ranks is the gradient of the whole batch.
    count = (lambda mb: mb.mask.sum().item()) if t.loss_agg == "token" else (lambda mb: float(len(mb.rows)))
    total = all_sum(torch.tensor([sum(count(mb) for mb in batches)], dtype=torch.float64, device=device)).item()
    total = max(total, 1.0)  # no buyer token anywhere (all replies cut by max_context): a zero gradient, not NaN
    loss_sum = 0.0
    model.train()
    for p in params:  # a gradient buffer for every LoRA tensor, so that the flat all_reduce below always lines up
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
    for mb in padded_for_all_ranks(batches, model, pad_id, device):
        if not mb.rows:  # FSDP2 padding: the same forwards and backward, changing nothing, keep the ranks in step
            (token_logprobs(model, mb.ids, mb.attn, temperature)[0].sum() * 0).backward()
            if old is None and t.kl_coef > 0:
                reference_logprobs(model, mb, temperature)
            continue
        width = mb.mask.shape[1]
        logp, entropy = token_logprobs(model, mb.ids, mb.attn, temperature, old is None, only=mb.mask)  # [B, T-1]
        if old is None:  # one on-policy update: the "old" policy is this very forward's (ratio exactly 1)
            old_logp = logp.detach()                                                             # [B, T-1]
            add_score_stats(stats, maxes, mb, logp, entropy)
            ref_logp = reference_logprobs(model, mb, temperature) if t.kl_coef > 0 else None    # [B, T-1]
        else:
            old_logp = rows_of(old, mb.rows, width, device)                                      # [B, T-1]
            ref_logp = rows_of(ref, mb.rows, width, device) if ref is not None else None         # [B, T-1]
        a = adv[mb.rows].to(device)[:, None].expand(-1, width)                                   # [B, T-1]
        if t.tis_cap > 0:  # w > 0, so min(r*wA, clip(r)*wA) = w * min(r*A, clip(r)*A): the token's loss times w
            a = a * tis_weights(old_logp, mb.engine_logp, t.tis_cap)                             # [B, T-1]
        loss = policy_loss(logp, old_logp, a, mb.mask, t.eps_low, t.eps_high, t.loss_agg, max_tokens)
        if ref_logp is not None:
            kl = kl_k3(logp, ref_logp)                                                           # [B, T-1]
            w = kl_round_weights(mb.reply, cfg.rollout.max_rounds - 1, t.kl_before_last_round)   # [B, T-1]
            loss = loss + t.kl_coef * aggregate(kl * w, mb.mask, t.loss_agg, max_tokens)
        weighted = loss * (count(mb) / total)
        weighted.backward()
        loss_sum += weighted.item()
        with torch.no_grad():
            m = mb.mask > 0
            ratio, a_m = torch.exp(logp - old_logp)[m], a[m]                                     # [n_tokens]
            clipped = ((ratio < 1 - t.eps_low) & (a_m < 0)) | ((ratio > 1 + t.eps_high) & (a_m > 0))
            add(stats, trained_tokens=m.sum(), clipped=clipped.sum(), ratio=ratio.sum(),
                kl_old=kl_k3(logp, old_logp)[m].sum())
            if ref_logp is not None:
                add(stats, kl_ref=kl[m].sum())
            if t.tis_cap > 0:
                w = tis_weights(old_logp, mb.engine_logp, t.tis_cap)[m]
                add(stats, tis_weight=w.sum(), tis_capped=(w >= t.tis_cap).sum())
            if m.any():
                maxes["ratio_max"] = max(maxes.get("ratio_max", 0.0), ratio.max().item())
                maxes["inv_ratio_max"] = max(maxes.get("inv_ratio_max", 0.0), (1 / ratio).max().item())
    # Gradient sync, by hand: every rank holds the gradient of its weighted share; their sum is the batch's.
    # (FSDP2 did the same sum during backward, reduce-scattering each layer's gradients as it went.)
    if not is_sharded(model):
        grads = [p.grad for p in params]
        flat = all_sum(torch.cat([g.reshape(-1) for g in grads]))
        for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(synced.view_as(g))
    norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
    grad_norm = full_tensor(norm).item()  # FSDP2: a replicated DTensor, the norm over all shards
    loss_total = all_sum(torch.tensor([loss_sum], dtype=torch.float64, device=device)).item()
    add(stats, loss=loss_total / world())  # summed over ranks once more in reduce_stats
    skipped = not (math.isfinite(grad_norm) and math.isfinite(loss_total))
    if skipped:
        optimizer.zero_grad(set_to_none=False)  # the update is dropped: weights and Adam moments stay as they were
    else:
        optimizer.step()
        scheduler.step()
    return grad_norm, skipped


def step_metrics(step, episodes, counts, times, device) -> dict:
    """The metrics.jsonl line of one step, less each side's training statistics: every reward.summarize metric
    (the buyer's view of all of the step's episodes), token counts, times, memory."""
    seller_probe = {"seller/probe_gap": times.pop("seller_probe_gap")} if "seller_probe_gap" in times else {}
    return {"step": step, **reward.summarize(episodes), "probe_gap": times.pop("probe_gap", None), **seller_probe,
            "tokens_generated": int(counts["generated_tokens"]), "sequence_tokens": int(counts["sequence_tokens"]),
            "tokens_per_s": counts["generated_tokens"] / max(times["rollout"], 1e-9),
            **{f"time_{k}": v for k, v in times.items()}, "peak_mem_gib": peak_memory_gib(device)}


def side_metrics(stats, maxes, grad_norms, skipped, scheduler) -> dict:
    """One side's training statistics of a step: loss, gradient, clipping, entropy, ratios, KL, engine gaps."""
    per = lambda key, n: stats[key] / max(n, 1.0) if key in stats else None  # noqa: E731
    generated, trained = stats.get("buyer_tokens", 0.0), stats.get("trained_tokens", 0.0)  # the side's tokens
    return {"loss": stats["loss"] / len(grad_norms), "grad_norm": sum(grad_norms) / len(grad_norms),
            "skipped_updates": skipped, "clip_fraction": per("clipped", trained), "entropy": per("entropy", generated),
            "kl_ref": per("kl_ref", trained), "kl_old": per("kl_old", trained),
            "ratio_mean": per("ratio", trained), "ratio_max": maxes.get("ratio_max"),
            "ratio_min": 1 / maxes["inv_ratio_max"] if maxes.get("inv_ratio_max") else None,
            "tis_weight_mean": per("tis_weight", trained), "tis_capped_fraction": per("tis_capped", trained),
            "logp_diff_abs_mean": per("logp_diff_abs", generated), "logp_diff_mean": per("logp_diff", generated),
            "logp_diff_abs_max": maxes.get("logp_diff_abs_max"), "tokens_trained": int(trained),
            "lr": scheduler.get_last_lr()[0]}


# ---------------------------------------------------------------------------------------------------------------
# Final held-out evaluation (eval.py's evaluate: the same env, rules and reward as training)


def evaluate_policy(cfg, model, engine, test, name: str, adapter: bool, seller_endpoint, seller=None,
                    episodes: int | None = None, seller_name: str | None = None) -> dict:
    """Every rank plays its share of the test products; returns eval.summarize_with_ci over all of them (and the
    mean full-information ceiling against a scripted seller). Runs under the same labels play under the same
    sampling seeds: "before" and "after" (and the starting and trained buyer of a generalisation row) are paired.
    seller / seller_name / episodes: another opponent than the training seller, and its number of episodes."""
    import eval as evaluation

    ev = cfg.eval
    products = evaluation.pick_products(test, ev.products or None)
    mine = products[rank()::world()]
    if name == "scripted":
        buyer = env.scripted_buyer(cfg.rollout.style, seed=ev.seed)
    else:
        buyer = build_buyer(cfg, engine, seed=ev.seed, temperature=ev.buyer_temperature)
        buyer.adapter = adapter
    seller = seller or build_seller(cfg, engine, seller_endpoint, seed=ev.seed)
    path = Path(cfg.out_dir) / f"eval_{name}_rank{rank()}.jsonl"
    path.unlink(missing_ok=True)  # a fresh evaluation: never mix with one an earlier attempt left behind
    with generation_weights(cfg, model):
        records = evaluation.evaluate(buyer, seller, mine, episodes_per_product=episodes or ev.episodes_per_product,
                                      max_rounds=cfg.rollout.max_rounds, batch_size=ev.batch_size,
                                      buyer_name="scripted" if name == "scripted" else "policy",
                                      seller_name=seller_name or cfg.seller.kind, persona=cfg.seller.persona,
                                      seed=ev.seed + rank(), out_path=path, progress=cfg.log.progress and rank() == 0,
                                      any_pending=engine_any_pending(engine, next(model.parameters()).device)
                                      ) if mine else []
    everything = [r for part in gather_objects(records) for r in part]
    ceilings = [r["ceiling"] for r in everything if r.get("ceiling") is not None]
    return evaluation.summarize_with_ci(everything) | {"episodes": len(everything)} | \
        ({"ceiling": sum(ceilings) / len(ceilings)} if ceilings else {})


def final_evaluation(cfg, model, engine, train, test, seller_endpoint, before: dict | None,
                     snapshots: league.Snapshots | None = None) -> dict:
    """{"before", "after", "scripted", "generalisation", "crossplay"} summaries; "before" was measured at step 0
    (kept in eval_before.json); "crossplay" in self-play runs."""
    result = {"before": before, "after": evaluate_policy(cfg, model, engine, test, "after", True, seller_endpoint)}
    if cfg.eval.scripted:
        result["scripted"] = evaluate_policy(cfg, model, engine, test, "scripted", False, seller_endpoint)
    if cfg.eval.generalisation_episodes > 0:
        result["generalisation"] = generalisation(cfg, model, engine, train, test, seller_endpoint, result)
    if snapshots is not None:
        result["crossplay"] = selfplay_crossplay(cfg, model, engine, train, test, snapshots, result)
    if rank() == 0:
        (Path(cfg.out_dir) / "final_eval.json").write_text(json.dumps(result, indent=2) + "\n")
        keys = ("episodes", "reward", "deal_rate", "bargained_ratio", "overshoot_rate", "protocol_violation_rate",
                "first_offer_ratio")
        print0(f"{'held-out':<10}" + "".join(f"{k[:17]:>18}" for k in keys))
        for name, row in result.items():
            if row and name not in ("generalisation", "crossplay"):
                print0(f"{name:<10}" + "".join(f"{_fmt(row.get(k)):>18}" for k in keys))
        if "generalisation" in result:
            print_generalisation(result["generalisation"])
        if "crossplay" in result:
            import report
            for title, head, rows in report.crossplay_tables(result["crossplay"]):
                print0(f"\n{title}\n" + report.text_table(head, rows))
    return result


def selfplay_crossplay(cfg, model, engine, train, test, snapshots: league.Snapshots, result: dict) -> dict:
    """The cross-play table of a self-play run (eval.crossplay_table's layout): the starting buyer (the base) and
    the trained buyer against the frozen base seller, the scripted seller family, the trained seller and its
    snapshots, on the held-out products (eval.episodes_per_product each, the same seeds in every cell); per seller
    also the best fixed schedule's reward against it (ladder style): how exploitable it is."""
    import eval as evaluation

    ev, ladder = cfg.eval, cfg.rollout.style == "ladder"
    sellers = {"base": False, "scripted:family": "scripted", "trained seller": league.ADAPTERS["seller"]}
    sellers |= {f"seller snapshot {s.step}": s.adapter for s in snapshots.taken["seller"] if s.step < cfg.train.steps}
    buyers = {"start": False, "trained": True}
    for path in ev.crossplay_buyers:   # e.g. the single-sided default's buyer: does the trained seller beat it?
        folder = Path(path) / "adapter" if (Path(path) / "adapter").is_dir() else Path(path)
        label = "buyer:" + "/".join(Path(path).resolve().parts[-2:])
        name = "".join(c if c.isalnum() else "_" for c in label)   # a peft adapter name: no dots
        if name not in model.peft_config:
            model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            model.set_adapter(league.ADAPTERS["buyer"])
        buyers[label] = name
    players = {}
    for sname, adapter in sellers.items():   # one player per seller serves its cells and its search
        players[sname] = league_player(cfg, engine, "seller", "scripted" if adapter == "scripted" else "base",
                                       ev.seed, 1)
        if adapter != "scripted":
            players[sname].adapter = adapter
    cells = {}
    for sname, seller in players.items():
        for bname, on in buyers.items():
            if bname == "trained" and sname == "base":
                cells[(bname, sname)] = result["after"]   # already measured: the same seeds and products
                continue
            if bname == "start" and sname == "base" and result.get("before"):
                cells[(bname, sname)] = result["before"]
                continue
            label = "".join(c if c.isalnum() else "_" for c in f"cross_{bname}_{sname}")
            cells[(bname, sname)] = evaluate_policy(cfg, model, engine, test, label, on, None, seller=seller,
                                                    seller_name=sname)
    table = evaluation.table_of_cells(cells, list(buyers), list(sellers))
    if ladder:
        search = train[:ev.best_response_products]
        held_out = evaluation.pick_products(test, ev.products or None)
        shortlist = evaluation.schedule_shortlist(search, held_out, cfg.rollout.max_rounds)
        with generation_weights(cfg, model):
            table["exploitability"] = {sname: evaluation.exploitability_of(seller, search, held_out,
                                                                           cfg.rollout.max_rounds, shortlist)
                                       for sname, seller in players.items()}
    return table


def generalisation(cfg, model, engine, train, test, seller_endpoint, result: dict) -> dict:
    """The starting policy (the adapter off: the policy of step 0, since LoRA B starts at zero) and the trained
    buyer against (a) the training seller (the before/after rows), (b) each scripted strategy with jitter and
    (c) the LLM seller at other temperatures, which they never trained against. Per seller also the best fixed
    ladder schedule's reward (the best response found by search on train products; ladder style) and, for the
    scripted ones, the mean full-information ceiling."""
    import eval as evaluation

    ev, rows = cfg.eval, {}
    ladder = cfg.rollout.style == "ladder"
    search = train[:ev.best_response_products]
    held_out = [p for p in evaluation.pick_products(test, ev.products or None) for _ in range(ev.generalisation_episodes)]
    shortlist: list[tuple] = []   # the scripted searches' best schedules: the candidates searched against an LLM

    def best_schedule(seller) -> dict:
        if isinstance(seller, env.ScriptedSeller):
            found = evaluation.best_fixed_schedule(seller, search, held_out, cfg.rollout.max_rounds, keep=4)
            shortlist.extend(tuple(s) for s, _ in found["top"] if tuple(s) not in shortlist)
            return found
        return evaluation.best_fixed_schedule(seller, search, held_out, cfg.rollout.max_rounds,
                                              candidates=shortlist or None)

    opponents = [(f"scripted:{s}", env.ScriptedSeller(s, jitter=ev.generalisation_jitter, seed=ev.seed))
                 for s in env.ScriptedSeller.STRATEGIES]
    for temperature in ev.generalisation_temperatures:
        seller = build_seller(cfg, engine, seller_endpoint, seed=ev.seed)
        seller.temperature = temperature
        opponents.append((f"llm:T={temperature}", seller))
    for label, seller in opponents:
        row = {who: evaluate_policy(cfg, model, engine, test, f"gen_{label.replace(':', '_')}_{who}", adapter,
                                    seller_endpoint, seller=seller, episodes=ev.generalisation_episodes,
                                    seller_name=label)
               for who, adapter in (("start", False), ("trained", True))}
        if ladder and cfg.seller.kind != "chat":
            with generation_weights(cfg, model):
                row["best_schedule"] = best_schedule(seller)
        rows[label] = row
    if result.get("before") and cfg.seller.kind != "chat":   # (a): the training seller, as it was evaluated
        row = {"start": result["before"], "trained": result["after"]}
        if ladder:
            seller = build_seller(cfg, engine, seller_endpoint, seed=ev.seed)
            with generation_weights(cfg, model):
                row["best_schedule"] = best_schedule(seller)
        rows = {f"training:{cfg.seller.kind}": row} | rows
    return rows


def print_generalisation(rows: dict) -> None:
    """One line per seller: start and trained reward, the best fixed schedule's, the ceiling, the ratios."""
    print0(f"\n{'seller':<18}{'start':>9}{'trained':>9}{'best sched':>11}{'ceiling':>9}"
           f"{'trained/best':>14}{'trained/ceiling':>17}")
    for label, row in rows.items():
        start, trained = row["start"]["reward"], row["trained"]["reward"]
        best = row.get("best_schedule", {}).get("test", {}).get("reward")
        ceiling = row["trained"].get("ceiling")
        ratio = lambda a, b: f"{a / b:.2f}" if a is not None and b else "-"  # noqa: E731
        print0(f"{label:<18}{_fmt(start):>9}{_fmt(trained):>9}{_fmt(best):>11}{_fmt(ceiling):>9}"
               f"{ratio(trained, best):>14}{ratio(trained, ceiling):>17}")


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


# ---------------------------------------------------------------------------------------------------------------
# The run: what it holds, how it starts, one step in five parts


@dataclass
class Run:
    """What a run holds from step to step (start_run builds it)."""
    cfg: object
    device: torch.device
    model: object                # the peft model (FSDP2-sharded or not)
    tokenizer: object
    engine: object               # HFEngine or VLLMEngine
    sides: dict                  # role -> Side: the buyer; with self-play also the seller
    snapshots: object            # league.Snapshots with self-play, else None
    probes: dict                 # role -> the vLLM freshness probe of that side's adapter ({} on the HF engine)
    endpoint: object             # a chat seller's endpoint, or None
    logs: Loggers
    train: list                  # the train products (the held-out ones are never trained on)
    test: list
    sleeps: bool                 # vLLM sleeps while the trainer works (GPU only)
    any_pending: object          # ranks that share a tensor-parallel engine decide together (None otherwise)

    @property
    def per_rank(self) -> int:
        return self.cfg.rollout.products_per_step // world()


def read_config(argv: list[str] | None) -> tuple:
    """Config: every value checked before anything heavy. Returns (cfg, world size)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise SystemExit("usage: [torchrun --nproc_per_node N] train.py CONFIG.yaml [key=value ...]")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(argv[0], argv[1:])
        cfg.validate(world_size)
    except ConfigError as e:
        raise SystemExit(f"train.py: {e}") from None
    return cfg, world_size


def start_distributed(cfg, world_size: int) -> tuple:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: the device, the process group, the run folder, the signal
    handlers and the host-memory check. Returns (device, cuda)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"train.py: device={cfg.device} but CUDA is not available here: use device=auto or cpu")
    device = torch.device(cfg.device if ":" in cfg.device else f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    seed_everything(cfg.seed)  # the same LoRA initialisation on every rank; per-rank seeds come after the model
    if rank() == 0:
        prepare_run_dir(cfg)
    if dist.is_initialized():
        dist.barrier()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Host RAM and /dev/shm for vLLM's sleep copies and adapter files (memory_plan.py), before anything loads.
    import memory_plan
    try:
        notice = memory_plan.check_host_memory(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    except memory_plan.HostMemoryError as e:
        raise SystemExit(f"train.py: {e}") from None
    if notice:
        print0(notice)
    return device, cuda


def load_data(cfg) -> tuple[list, list]:
    """The train and held-out products; the held-out split is never trained on."""
    try:
        scenarios = data.load_scenarios(cfg.data.path or None, budget_factor=cfg.data.budget_factor)
        train, test = data.split_scenarios(scenarios, seed=cfg.data.split_seed, test_size=cfg.data.test_size)
    except (OSError, ValueError) as e:  # data.DataError is a ValueError
        raise SystemExit(f"train.py: data: {e}") from None
    print0(f"data: {len(train)} train / {len(test)} test products; {cfg.rollout.products_per_step} products x "
           f"{cfg.rollout.group_size} episodes per step over {world()} rank(s)")
    return train, test


def start_run(cfg, device, cuda: bool, train, test) -> tuple[Run, int]:
    """Model, sides (adapter + optimiser each), engine, resume, probes, seller endpoint, logs. Returns (the run,
    the step it starts at)."""
    import model as model_lib
    model, tokenizer = model_lib.load_policy(cfg.model, str(device), verbose=rank() == 0)
    if dist.is_initialized():  # identical replicas from the start, whatever the loader did (as DDP does)
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    selfplay = cfg.selfplay.mode != "off"
    if selfplay:  # the seller learns back: its own adapter on the same base (league.py), sharded with the rest
        league.add_seller_adapter(model, cfg.seed)
    if cfg.train.sharding == "fsdp2" and world() > 1:  # the bf16 base, LoRA and AdamW sharded over the ranks
        shard(model)
        if cuda:  # the full copy each rank loaded (57 GiB for the 30B) stays cached by PyTorch's allocator unless
            torch.cuda.empty_cache()  # returned: vLLM sizes its share from the device's free memory
    elif cfg.train.sharding == "fsdp2":
        print0("train.sharding=fsdp2 with one rank: nothing to shard over; training unsharded")
    # (under FSDP2 the buyer's params are this rank's shards, DTensors)
    sides = {"buyer": make_side(cfg, model, "buyer", [p for p in model.parameters() if p.requires_grad])}
    # The engine first: vLLM reseeds the process's global RNGs when it starts (random, numpy, torch, with the
    # engine's seed), so it must start before the per-rank seeding below and before a resume restores them.
    engine = build_engine(cfg, model, tokenizer)
    snapshots = None
    if selfplay:
        sides["seller"] = make_side(cfg, model, "seller", league.adapter_params(model, league.ADAPTERS["seller"]))
        snapshots = league.Snapshots(model, cfg.out_dir, cfg.selfplay.max_snapshots,
                                     engine if cfg.engine.kind == "vllm" else None)
    seed_everything(cfg.seed + rank())  # differently per rank, reproducibly
    start_step = 0
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, sides)
        start_step = state["step"]
        if snapshots is not None:
            snapshots.restore(start_step)
        print0(f"resumed from {resume_from} (step {start_step}, data position {state['data_position']})")
    for side in sides.values():  # the engine generates with the (possibly resumed) policy from the first rollout on
        engine.sync(model, side.adapter)
    probes = {r: freshness_probe(tokenizer, train[0], cfg.rollout.style) for r in sides} \
        if cfg.engine.kind == "vllm" else {}
    endpoint = None
    if cfg.seller.kind == "chat":
        from engine import ChatEndpoint
        endpoint = ChatEndpoint(cfg.seller.url, cfg.seller.model, api_key_env=cfg.seller.api_key_env)
        endpoint.check()
    run = Run(cfg, device, model, tokenizer, engine, sides, snapshots, probes, endpoint, Loggers(cfg, start_step),
              train, test, sleeps=cfg.engine.kind == "vllm" and cfg.engine.sleep and torch.cuda.is_available(),
              any_pending=engine_any_pending(engine, device))  # None unless ranks share a tensor-parallel engine
    return run, start_step


def evaluate_before(run: Run, start_step: int) -> dict | None:
    """The starting policy on the held-out products, measured once and kept (eval_before.json) for resumed runs."""
    cfg = run.cfg
    if cfg.eval.episodes_per_product <= 0:
        return None
    path = Path(cfg.out_dir) / "eval_before.json"
    if start_step > 0 and path.exists():
        return json.loads(path.read_text())
    if start_step > 0:
        print0("note: no eval_before.json in the run folder; 'before' is measured on the resumed policy")
    before = evaluate_policy(cfg, run.model, run.engine, run.test, "before", True, run.endpoint)
    if rank() == 0:
        path.write_text(json.dumps(before, indent=2) + "\n")
    return before


def grpo_step(run: Run, step: int) -> dict | None:
    """One GRPO step in five parts; returns its metrics, or None when a stop signal arrived during the rollouts
    (the step is dropped and the state before it saved)."""
    cfg, model, G = run.cfg, run.model, run.cfg.rollout.group_size
    learning = [run.sides[r] for r in league.learning_roles(cfg.selfplay.mode, step, cfg.selfplay.switch_every)]

    # 1. rollouts: this rank's products, G episodes each (consecutive), against the seller (or the league)
    t0 = time.perf_counter()
    games, pairings = play_rollouts(run, step, learning)
    if games is None:  # the weights are still those after `step` steps: save that state
        save_checkpoint(cfg, model, run.sides, step)
        return None
    times = {"rollout": time.perf_counter() - t0}

    # 2. rewards -> advantages, per side that learns now, per group of G episodes of one product
    advantages = {x.role: group_advantages(x.rewards(games), G, cfg.train.adv_scale) for x in learning}  # [n_local]

    # 3. each side's current ("old") log-probs of the tokens it generated, then its optimiser updates
    t1 = time.perf_counter()
    if run.sleeps:
        run.engine.sleep()  # vLLM frees the GPU while the trainer works
    trained = {x.role: train_side(model, x, games, league.trained_rows(pairings, x.role, G), advantages[x.role], cfg,
                                  run.tokenizer.pad_token_id, run.device, step) for x in learning}
    times["train"] = time.perf_counter() - t1

    # 4. the engine gets the new weights (HF: it shares them; vLLM: wake up, load, check with a probe)
    t2 = time.perf_counter()
    sync_engine(run, trained, times)
    times["sync"] = time.perf_counter() - t2
    times["step"] = time.perf_counter() - t0

    # 5. metrics over all ranks, logs, snapshots
    metrics = log_step(run, step, games, pairings, advantages, trained, times)
    if run.snapshots is not None and (step + 1) % cfg.selfplay.snapshot_every == 0:
        for role in run.sides:   # a side's snapshot only if it learned since its last one
            if any(role in league.learning_roles(cfg.selfplay.mode, k, cfg.selfplay.switch_every)
                   for k in range(step + 1 - cfg.selfplay.snapshot_every, step + 1)):
                run.snapshots.take(role, step + 1, write=rank() == 0)
    return metrics


def play_rollouts(run: Run, step: int, learning: list[Side]) -> tuple:
    """Step 1: (games, each group's pairing), or (None, None) when a stop signal arrived. Single-sided, the buyer
    plays the configured seller; with self-play each group's opponent is drawn from the league."""
    cfg, G, per_rank = run.cfg, run.cfg.rollout.group_size, run.per_rank
    products = step_products(run.train, step, cfg.rollout.products_per_step, cfg.seed)[rank() * per_rank:][:per_rank]
    seed = rollout_seed(cfg.seed, step, rank())
    if run.snapshots is None:  # the paper: the buyer learns against the configured seller
        pairings = [{"buyer": "learner", "seller": cfg.seller.kind}] * per_rank
        buyer, seller = build_buyer(cfg, run.engine, seed), build_seller(cfg, run.engine, run.endpoint, seed + 500, G)
    else:
        pairings = league.draw_pairings([x.role for x in learning], per_rank, league.league_weights(cfg.selfplay),
                                        run.snapshots.names(), seed)
        buyer, seller = league_players(cfg, run.engine, pairings, seed)
    try:
        with generation_weights(cfg, run.model):  # HF engine on a sharded trainer: the whole model on every rank
            games = env.play([p for p in products for _ in range(G)], buyer, seller, cfg.rollout.max_rounds,
                             on_round=abandon_if_stopping(run.any_pending), any_pending=run.any_pending)
        abandoned = False
    except Abandon:
        abandoned = True
    return (None, None) if any_rank(abandoned, run.device) else (games, pairings)


def sync_engine(run: Run, trained: dict, times: dict) -> None:
    """Step 4 on vLLM: wake up, load the adapters of the sides that learned, and check each with its probe (the
    engine's and the trainer's scores of a fixed sequence; a stale engine raises)."""
    if run.cfg.engine.kind != "vllm":
        return
    import vllm_engine
    if run.sleeps:
        run.engine.wake_up()
    for role in trained:
        run.engine.sync(run.model, run.sides[role].adapter)
    for role, probe in run.probes.items():   # the buyer's every step (its adapter must not move when it did not
        if role == "buyer" or role in trained:   # learn); the seller's on the steps it learned
            adapter = run.sides[role].adapter
            active = nullcontext() if role == "buyer" else active_adapter(run.model, adapter)
            trainer_scores = lambda ids: vllm_engine.token_logprobs(run.model, ids)  # noqa: E731
            with active:
                gap = vllm_engine.check_freshness(run.engine, probe, trainer_scores, role == "buyer" or adapter)
            times["probe_gap" if role == "buyer" else "seller_probe_gap"] = gap


def log_step(run: Run, step: int, games, pairings, advantages: dict, trained: dict, times: dict) -> dict:
    """Step 5: the metrics.jsonl line (the episodes of every rank, each learning side's training statistics with
    the seller's prefixed "seller/"), a few transcripts, the progress bar's numbers."""
    cfg, device, G = run.cfg, run.device, run.cfg.rollout.group_size
    convs = lambda r: [g.state[r] for g in games if isinstance(g.state.get(r), env.Conversation)]  # noqa: E731
    counts, _ = reduce_stats({"sequence_tokens": sum(len(c.ids) for c in convs("buyer")),
                              "generated_tokens": sum(sum(c.mask) for r in league.ROLES for c in convs(r))}, {}, device)
    episodes = [e for part in gather_objects([episode_stats(g.outcome) for g in games]) for e in part]
    metrics = step_metrics(step + 1, episodes, counts, times, device)
    for role, (stats, maxes, grad_norms, skipped) in trained.items():
        stats, maxes = reduce_stats(stats, maxes, device)
        prefix = "" if role == "buyer" else "seller/"
        metrics |= {prefix + k: v for k, v in side_metrics(stats, maxes, grad_norms, skipped,
                                                           run.sides[role].scheduler).items()}
    if run.snapshots is not None:
        metrics |= selfplay_metrics(games, pairings, run.sides["seller"])
    probe = run.probes.get("buyer")
    metrics |= {"probe_trainer_moved": getattr(probe, "trainer_moved", None),  # how far each side's scores
                "probe_engine_moved": getattr(probe, "engine_moved", None)}   # of the probe moved this step
    adv = next(iter(advantages.values()))
    transcripts = [{"step": step + 1, "group": k, "advantage": adv[k * G].item()} |
                   ({"pairing": pairings[k]} if run.snapshots is not None else {}) | games[k * G].outcome.to_dict()
                   for k in range(min(cfg.log.transcripts_per_step, run.per_rank))]
    run.logs.log(metrics, transcripts)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict:
    cfg, world_size = read_config(argv)
    device, cuda = start_distributed(cfg, world_size)
    train, test = load_data(cfg)
    run, start_step = start_run(cfg, device, cuda, train, test)
    before = evaluate_before(run, start_step)

    from tqdm import tqdm
    bar = tqdm(total=cfg.train.steps, initial=start_step, desc="grpo", unit="step", dynamic_ncols=True,
               disable=rank() != 0 or not cfg.log.progress)
    metrics: dict = {}
    for step in range(start_step, cfg.train.steps):
        metrics = grpo_step(run, step)
        if metrics is None:  # stopped during the rollouts (saved)
            break
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", deal=f"{metrics['deal_rate']:.2f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        stopping = any_rank(STOP["signal"] is not None, device)
        if stopping or step + 1 == cfg.train.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            save_checkpoint(cfg, run.model, run.sides, step + 1)
        if stopping:
            break
    bar.close()

    if STOP["signal"] is not None:
        print0(f"stopped by signal {STOP['signal']}; checkpoint saved in {cfg.out_dir}; rerun the same command to resume")
        leave_process_group(cfg, world_size)
        sys.exit(128 + STOP["signal"])
    metrics = metrics or {}
    if cfg.eval.episodes_per_product > 0:
        metrics["final_eval"] = final_evaluation(cfg, run.model, run.engine, train, test, run.endpoint, before,
                                                 run.snapshots)
    leave_process_group(cfg, world_size)
    return metrics


def leave_process_group(cfg, world_size: int) -> None:
    """Destroy the process group we created. vLLM joins (or, alone, creates) it and tears it down itself at exit,
    failing if it is already gone, so with the vLLM engine we leave that to vLLM."""
    if world_size > 1 and cfg.engine.kind == "hf" and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
