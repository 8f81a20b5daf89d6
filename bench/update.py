"""One GRPO update on a fixed batch of recorded episodes: old log-prob recomputation (no gradient), the clipped loss,
backward, the optimiser step. Three ways, on the same batch, model weights and advantages:

- ours:   train.score_rollouts + train.update, micro-batches packed by train.pack_by_tokens (length-sorted, rows x
          longest <= train.micro_batch_tokens).
- padded: the very same functions with train.pack_by_tokens swapped for the naive batching a user writes first:
          episodes in their order, a fixed number of rows per micro-batch (as many as the longest episode allows
          in the same token budget), each padded to its longest row.
- trl:    TRL's GRPOTrainer (loss_type="dapo" = token-level normalisation, like ours; beta 0; the same clip range
          and temperature). The batch is laid out as TRL lays out a generation batch: prompt = the buyer's opening
          (left-padded), completion = the rest of the conversation (right-padded), tool_mask = the buyer mask
          (TRL's multi-turn masking), every row padded to the batch's widest, then cut into
          per_device_train_batch_size rows, as many as fit the same token budget. Old log-probs come from TRL's
          own `_get_per_token_logps_and_entropies`, the loss from its `compute_loss`.

Before any timing, the three losses and gradients are compared on one batch with old log-probs perturbed (so that
ratios differ from 1 and clipping acts): in float32 the same loss to 1e-5 and the same gradient to 1e-4 relative
(bfloat16: 5e-3 and 5e-2), or the benchmark stops. TRL is optional: install it next to the venv without touching it (see bench/README.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

import train

BENCH_SITE = Path(__file__).resolve().parents[1] / ".venv-bench"  # pip install --target .venv-bench ... (README)


def import_trl():
    """TRL from the environment, else from .venv-bench (appended to sys.path, so the pinned stack wins)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        if not BENCH_SITE.exists():
            return None
        sys.path.append(str(BENCH_SITE))
        try:
            import trl  # noqa: F401
        except ImportError:
            return None
    import warnings
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    import trl
    return trl


# ---------------------------------------------------------------------------------------------------------------
# The batch


def recorded_batch(games, group_size: int):
    """(buyer conversations, advantages [N]) of one rollout, exactly what train.py feeds its update."""
    convs = [g.state["buyer"] for g in games]
    adv = train.group_advantages([g.outcome.reward for g in games], group_size)
    return convs, adv


def length_spread(convs) -> dict:
    lengths = sorted(len(c.ids) for c in convs)
    return {"episodes": len(lengths), "min_len": lengths[0], "median_len": lengths[len(lengths) // 2],
            "max_len": lengths[-1], "sequence_tokens": sum(lengths),
            "trained_tokens": sum(sum(c.mask[1:]) for c in convs)}


def in_order_chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """The naive batching: fixed-size runs in the given order, as many rows as the longest sequence allows."""
    rows = max(1, max_tokens // max(lengths))
    return [list(range(i, min(i + rows, len(lengths)))) for i in range(0, len(lengths), rows)]


@contextlib.contextmanager
def naive_batching():
    """train.micro_batches with in-order fixed-size batches instead of length-sorted packing."""
    original = train.pack_by_tokens
    train.pack_by_tokens = in_order_chunks
    try:
        yield
    finally:
        train.pack_by_tokens = original


def padded_tokens(convs, chunks) -> int:
    return sum(len(ch) * max(len(convs[i].ids) for i in ch) for ch in chunks)


# ---------------------------------------------------------------------------------------------------------------
# Ours and naive padding: train.py's own functions


def ours_update(model, optimizer, convs, adv, cfg, pad_id, old=None) -> dict:
    """train.score_rollouts (unless `old` is given) then one train.update over every episode."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    stats, maxes = {}, {}
    if old is None:
        old, _ = train.score_rollouts(model, convs, cfg, pad_id, device, stats, maxes)
    grad_norm, skipped = train.update(model, params, optimizer, scheduler, convs, list(range(len(convs))), adv, old,
                                      None, cfg, pad_id, device, stats, maxes)
    return {"loss": stats["loss"], "grad_norm": grad_norm}


# ---------------------------------------------------------------------------------------------------------------
# TRL


class TRLBatch:
    """The batch in TRL's generation-batch layout (see the module docstring)."""

    def __init__(self, convs, adv, pad_id, rows_per_chunk: int):
        self.prompt_lens = [c.mask.index(1) if 1 in c.mask else len(c.ids) - 1 for c in convs]
        P = max(self.prompt_lens)
        C = max(len(c.ids) - p for c, p in zip(convs, self.prompt_lens))
        n = len(convs)
        self.prompt_ids = torch.full((n, P), pad_id, dtype=torch.long)
        self.prompt_mask = torch.zeros((n, P), dtype=torch.long)
        self.completion_ids = torch.full((n, C), pad_id, dtype=torch.long)
        self.completion_mask = torch.zeros((n, C), dtype=torch.long)
        self.tool_mask = torch.ones((n, C), dtype=torch.long)  # TRL pads tool_mask with 1; completion_mask gates it
        for i, (c, p) in enumerate(zip(convs, self.prompt_lens)):
            self.prompt_ids[i, P - p:] = torch.tensor(c.ids[:p])
            self.prompt_mask[i, P - p:] = 1
            rest = len(c.ids) - p
            self.completion_ids[i, :rest] = torch.tensor(c.ids[p:])
            self.completion_mask[i, :rest] = 1
            self.tool_mask[i, :rest] = torch.tensor(c.mask[p:])
        self.advantages = adv.float()
        self.width = P + C
        self.rows = rows_per_chunk
        self.n = n

    def old_from_ours(self, old: list[torch.Tensor]) -> torch.Tensor:
        """Our per-episode old log-probs (over ids[1:]) moved to TRL's completion positions: [N, C]."""
        out = torch.zeros(self.completion_ids.shape)
        for i, p in enumerate(self.prompt_lens):
            values = old[i][p - 1:]
            out[i, :len(values)] = values
        return out

    def chunks(self):
        return [slice(s, min(s + self.rows, self.n)) for s in range(0, self.n, self.rows)]

    def inputs(self, sl: slice, old: torch.Tensor, num_items: torch.Tensor) -> dict:
        return {"prompt_ids": self.prompt_ids[sl], "prompt_mask": self.prompt_mask[sl],
                "completion_ids": self.completion_ids[sl], "completion_mask": self.completion_mask[sl],
                "tool_mask": self.tool_mask[sl], "advantages": self.advantages[sl],
                "old_per_token_logps": old[sl], "num_items_in_batch": num_items}


def placeholder_dataset(n: int):
    """The `train_dataset` GRPOTrainer insists on (it never reads it here), built with a fixed fingerprint.
    Without one, `datasets` fingerprints the new dataset by pickling its state with dill, and dill pickles by
    value every module it does not take for an installed one: .venv-bench's pyarrow when that folder is not under
    the running venv's prefix, which then fails on pyarrow's MonthDayNano ("not found as builtins.MonthDayNano")."""
    import pyarrow as pa
    from datasets import Dataset

    return Dataset(pa.table({"prompt": ["x"] * n}), fingerprint="nego-grpo-bench-placeholder")


def make_trl_trainer(trl, model, tokenizer, cfg, n_episodes: int, out_dir: str):
    """A GRPOTrainer around `model` with our loss settings; only its loss machinery is used (the chunking into
    per-device batches is TRLBatch's, so its batch-size fields only need to be valid)."""
    t, r = cfg.train, cfg.rollout
    args = trl.GRPOConfig(
        output_dir=out_dir, use_cpu=not torch.cuda.is_available(), report_to=[], fp16=False,
        bf16=next(model.parameters()).dtype == torch.bfloat16 or cfg.model.dtype == "bfloat16" and torch.cuda.is_available(),
        per_device_train_batch_size=r.group_size, gradient_accumulation_steps=max(1, n_episodes // r.group_size),
        num_generations=r.group_size, max_completion_length=r.buyer_max_tokens * r.max_rounds,
        temperature=r.buyer_temperature, loss_type="dapo", beta=0.0, epsilon=t.eps_low, epsilon_high=t.eps_high,
        learning_rate=t.lr, max_grad_norm=t.grad_clip, logging_steps=10**9, save_strategy="no",
        disable_dropout=True, gradient_checkpointing=cfg.model.gradient_checkpointing)  # TRL defaults to True
    dataset = placeholder_dataset(n_episodes)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation  # normaliser = all tokens
    return trainer


def trl_update(trainer, model, optimizer, batch: TRLBatch, grad_clip: float, old=None) -> dict:
    """TRL's old log-probs (unless given), then compute_loss + backward per chunk, clip, one optimiser step."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1).to(device)
    attn = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1).to(device)
    C = batch.completion_ids.shape[1]
    if old is None:
        with torch.no_grad():
            old, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, C, batch_size=batch.rows)
    num_items = (batch.completion_mask * batch.tool_mask).sum().float()
    model.train()
    optimizer.zero_grad(set_to_none=False)
    loss_sum = 0.0
    for sl in batch.chunks():
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.inputs(sl, old, num_items).items()}
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")).item()
    optimizer.step()
    return {"loss": loss_sum, "grad_norm": grad_norm}


# ---------------------------------------------------------------------------------------------------------------
# Fairness check and timing


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters() if p.requires_grad])


def check_equal(model, trl_model, trainer, convs, adv, cfg, pad_id, trl_batch, seed: int = 0) -> dict:
    """Loss and gradient of ours, padded and TRL on the same weights and perturbed old log-probs; no weights move
    (lr 0, no clipping). Raises if they differ."""
    device = next(model.parameters()).device
    nocfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=0.0))
    stats, maxes = {}, {}
    with torch.no_grad():
        current, _ = train.score_rollouts(model, convs, cfg, pad_id, device, stats, maxes)
    g = torch.Generator().manual_seed(seed)
    old = [c + 0.3 * torch.randn(c.shape, generator=g) for c in current]  # ratios spread over both clip edges
    still = lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)  # noqa: E731
    out = {}
    a = ours_update(model, still(model), convs, adv, nocfg, pad_id, old=old)
    ga = flat_grad(model)
    with naive_batching():
        b = ours_update(model, still(model), convs, adv, nocfg, pad_id, old=old)
    gb = flat_grad(model)
    out["padded_loss_diff"] = abs(a["loss"] - b["loss"])
    out["padded_grad_rel_diff"] = ((ga - gb).norm() / ga.norm().clamp(min=1e-12)).item()
    if trainer is not None:
        c = trl_update(trainer, trl_model, still(trl_model), trl_batch, 0.0, old=trl_batch.old_from_ours(old))
        gc = flat_grad(trl_model)
        out["trl_loss_diff"] = abs(a["loss"] - c["loss"])
        out["trl_grad_rel_diff"] = ((ga - gc).norm() / ga.norm().clamp(min=1e-12)).item()
    out["loss"] = a["loss"]
    # float32: only the summation order differs. bfloat16 rounds each batch layout differently.
    loss_tol, grad_tol = (1e-5, 1e-4) if next(model.parameters()).dtype == torch.float32 else (5e-3, 5e-2)
    bad = {k: v for k, v in out.items()
           if k.endswith("loss_diff") and v > loss_tol or k.endswith("grad_rel_diff") and v > grad_tol}
    if bad:
        raise AssertionError(f"the updates do not compute the same loss/gradient, the comparison would be unfair: {out}")
    return out


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model, state: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def adamw(model, cfg):
    t = cfg.train
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
