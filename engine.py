"""Generation engines: HFEngine (the trainer's own model, CPU or GPU) and ChatEndpoint (any OpenAI-compatible
server, for sellers that are not the base model).

    engine = HFEngine(peft_model, tokenizer)
    gens = engine.generate(prompt_id_lists, temperature=1.0, max_tokens=256, adapter=True, seed=0)
    gens[0].token_ids, gens[0].logprobs, gens[0].text, gens[0].finished

Deliberate choices:
- A hand-written sampling loop over the model's forward with a KV cache instead of `model.generate`: it returns
  the log-prob of each sampled id under exactly the distribution it was sampled from (logits / temperature, no
  top-k/top-p), runs the prompt once, and drops finished rows from the batch and the cache so that a long
  answer does not keep the short ones' compute alive. Measured on CPU (random Qwen3, 16 prompts x 128 new
  tokens, some rows stopping early): 1.2-2x the tokens/s of `model.generate` at 3M and 55M parameters.
- Prompts are sorted by length before batching (less left padding) and results are returned in input order.
  Identical prompts in a batch (the G episodes of a group all open with the same prompt) are prefilled once.
- A game's next prompt extends its last one (prompt + reply + the other side's turn), so the engine keeps each
  row's KV cache from its previous call (PrefixStore) and prefills only the new tokens. Without it, a step's
  rollouts re-ran 57k prompt tokens to generate 3.3k, and prefill was 70% of rollout time on CPU (configs/cpu.yaml,
  6 rounds). The store holds the last call's rows, per adapter setting (and for one more call those of the call
  before that it did not extend: two players on one setting alternate), and is dropped whenever any weight
  changed (a parameter's version counter), so a hit always means the same weights and the same tokens.
- Each call's KV cache is one buffer per layer with room for the reply (RoomyLayer): a forward writes its keys
  and values in place and attends over a view, where transformers' DynamicCache concatenates the whole cache at
  every decode step. The same numbers in the same order, so the same samples; with the prefix store's rows moved
  in one indexing per layer, an evaluation (512 episodes) went from 28.2 s to 25.6 s on CPU (medians of 3).
- engine.merged_copies (small models): sampling runs on plain copies of the model, the base and the base with
  the adapter merged, refreshed in place after each optimiser step, not through peft's wrappers. The CPU
  default's rollouts took 23% less (AMD EPYC, AVX2), and its three seeds sampled exactly the same tokens (the
  log-probs differ in float rounding: the largest engine-vs-trainer gap of a run 1.3e-5 before, 3.6e-5 after).
- Log-probs are computed in float32 whatever the model dtype, so they compare with the trainer's.
- adapter=False runs the same weights under `disable_adapter()`: one copy of the base serves buyer and seller.
  adapter="seller" (a peft adapter name) runs that adapter instead of the active one: self-play's two sides.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Generation:
    token_ids: list[int]  # the ids the model generated, verbatim, including the stop id if it stopped on one
    logprobs: list[float]  # log-prob of each generated id under the sampling distribution (logits / temperature)
    text: str  # tokenizer.decode(token_ids, skip_special_tokens=True)
    finished: bool  # True if it stopped on a stop id, False if cut at max_tokens


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end an assistant turn: the tokenizer's eos, <|im_end|> when the vocabulary has it, and the
    model's generation_config eos ids (Qwen3 lists both <|im_end|> and <|endoftext|> there)."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos_token and no <|im_end|> token: generation could never stop")
    return sorted(ids)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] input ids and attention mask, prompts right-aligned so that every row's next token is at -1."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def sample_next(logits: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (ids [B], their log-probs [B]) under softmax(logits / temperature); greedy for 0,
    whose log-prob is that of the untempered distribution."""
    logits = logits.float()
    if temperature == 0:
        ids = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return ids, logp.gather(1, ids[:, None]).squeeze(1)


@contextmanager
def active_adapter(model, name: str):
    """peft's adapter `name` active inside, the previously active one (and which LoRA weights require grad:
    peft's set_adapter switches that too) restored afterwards. Self-play's buyer ("default") and seller share one
    base this way."""
    before = model.active_adapter
    trainable = [(p, p.requires_grad) for n, p in model.named_parameters() if "lora_" in n]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(before)
        for p, flag in trainable:
            p.requires_grad_(flag)


@contextmanager
def generation_mode(model, adapter: bool | str):
    """eval mode (no dropout, KV cache allowed under gradient checkpointing), no autograd; the adapter on (True:
    the active one, a name: that one) or off (False: the frozen base); the training mode is restored afterwards."""
    was_training = model.training
    if isinstance(adapter, str):
        choose = active_adapter(model, adapter)
    else:
        choose = model.disable_adapter() if (not adapter and hasattr(model, "disable_adapter")) else nullcontext()
    model.eval()
    try:
        with choose, torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class HFEngine:
    def __init__(self, model, tokenizer, max_batch_tokens: int = 32768, merged_copies: bool = False):
        self.model = model  # the live (peft) model the trainer updates; not a DDP wrapper
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens  # cap on rows * (longest prompt + max_tokens) per forward batch
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.stores: dict[bool | str, PrefixStore] = {}  # adapter on/off/name -> the KV of the last call's rows
        self.merged_copies = merged_copies  # sample from plain copies (merged_copy), not through peft's wrappers
        self.copies: dict[bool | str, tuple[tuple, torch.nn.Module]] = {}  # adapter -> (weights version, copy)

    def sync(self, model, adapter: str = "default") -> None:
        """Nothing to do: the engine generates with the trainer's own model object (every adapter of it)."""

    def generate(self, prompts: list[list[int]], *, temperature: float, max_tokens: int, adapter: bool | str,
                 seed: int | None = None) -> list[Generation]:
        check_generate_args(prompts, temperature, max_tokens)
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        previous = self.stores.get(adapter)
        version = weights_version(self.model)
        if previous is not None and previous.weights != version:
            previous = None  # an optimiser step (or a load) since: the cached keys and values are stale
        store = PrefixStore(version)
        net = self.copy_for(adapter, version) if self.merged_copies else self.model
        with generation_mode(self.model, adapter) if net is self.model else torch.inference_mode():
            for batch in self.batches(order, prompts, max_tokens):
                gens = self.generate_batch(net, [prompts[i] for i in batch], temperature, max_tokens, generator,
                                           device, previous, store)
                for i, g in zip(batch, gens):
                    results[i] = g
        if previous is not None:
            store.keep_unextended(previous)
        self.stores[adapter] = store
        return results

    def copy_for(self, adapter: bool | str, version: tuple) -> torch.nn.Module:
        """The plain model that generates for this adapter setting, up to date: the base's copy is made once (its
        weights never change while training; a load changes their version), an adapter's is refreshed in place
        whenever any weight changed (an optimiser step), or rebuilt where refresh_merged cannot."""
        if adapter is False:
            version = weights_version(self.model, lambda name: "lora_" not in name)
        held = self.copies.get(adapter)
        if held is not None and held[0] == version:
            return held[1]
        if held is None or adapter is False or not refresh_merged(held[1], self.model, adapter):
            held = (version, merged_copy(self.model, adapter))
        self.copies[adapter] = (version, held[1])
        return held[1]

    def batches(self, order: list[int], prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Consecutive runs of the length-sorted indices whose rows * (longest + max_tokens) fit the budget."""
        out, cur = [], []
        for i in order:  # sorted by length, so the newest prompt is the longest in `cur`
            if cur and (len(cur) + 1) * (len(prompts[i]) + max_tokens) > self.max_batch_tokens:
                out.append(cur)
                cur = []
            cur.append(i)
        return out + [cur]

    def generate_batch(self, net, prompts, temperature, max_tokens, generator, device, previous=None,
                       store=None) -> list[Generation]:
        unique, copy_of = dedupe(prompts)
        hits = [previous.longest_prefix(p) if previous is not None else None for p in unique]
        ids, mask, positions, cache = prefill_inputs(unique, hits, self.pad_id, device,
                                                     self.model.config.num_hidden_layers, max_tokens)
        logits = net(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1]
        if len(unique) < len(prompts):  # identical prompts (a GRPO group's opening turn) share one prefill
            rows_of = torch.tensor(copy_of, device=device)
            cache.batch_select_indices(rows_of)
            logits, mask, positions = logits[rows_of], mask[rows_of], positions[rows_of]
        stop = torch.tensor(self.stop_ids, device=device)
        rows = torch.arange(len(prompts), device=device)  # which original rows are still generating
        next_pos = positions[:, -1] + 1
        out_ids = [[] for _ in prompts]
        out_logp = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for step in range(max_tokens):
            tok, logp = sample_next(logits, temperature, generator)
            for r, t, lp in zip(rows.tolist(), tok.tolist(), logp.tolist()):
                out_ids[r].append(t)
                out_logp[r].append(lp)
            done = torch.isin(tok, stop)
            for r in rows[done].tolist():
                finished[r] = True
            last = step == max_tokens - 1 or bool(done.all())
            if store is not None:  # the rows leaving the batch: their KV (prompt + reply but its last id) is kept
                leaving = torch.ones_like(done) if last else done
                store.add_rows(cache, mask, leaving, [prompts[r] + out_ids[r][:-1] for r in rows[leaving].tolist()])
            if last:
                break
            if bool(done.any()):  # drop finished rows from the batch and the KV cache
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            logits = net(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                         past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        return [Generation(token_ids=out_ids[r], logprobs=out_logp[r], finished=finished[r],
                           text=self.tokenizer.decode(out_ids[r], skip_special_tokens=True))
                for r in range(len(prompts))]


def merged_copy(model, adapter: bool | str) -> torch.nn.Module:
    """A plain transformers model (no peft wrappers), in eval mode, that computes what `model` computes under
    generation_mode(model, adapter): the base's weights for adapter=False, each adapted weight W + scale * B @ A
    (peft's own merge) for True (the active adapter) or a name. Why: on a small model the sampling loop is
    overhead-bound, and peft's wrappers (three matmuls, a scale and an add per adapted linear, in Python) cost a
    tenth of a rollout on CPU. The base's weights are copied exactly; the merged ones differ from the unmerged sum
    only in float rounding (B starts at zero, so at step 0 they are exactly the base's). Log-probs then agree with
    the trainer's to float rounding, as padding and caching already make them. A copy of the whole model per
    setting: for small models (engine.merged_copies)."""
    import copy
    if not hasattr(model, "peft_config"):  # already plain: nothing to merge
        return model
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
        p.grad = None
    if adapter is False:
        plain = twin.unload()
    else:
        name = twin.active_adapter if adapter is True else adapter
        plain = twin.merge_and_unload(adapter_names=[name])
    return plain.eval()


def refresh_merged(plain, model, adapter: bool | str) -> bool:
    """Write each adapted weight W + scale * B @ A (peft's own merge: the same sum, so the same bits as a fresh
    merged_copy) into the plain copy in place, instead of copying the whole model again at every step (a deepcopy
    of the peft model cost more than half of what its copy saved per rollout). False, changing nothing, where a
    layer is not a plain LoRA linear (fused experts, DoRA, LoRA bias): the caller then rebuilds the copy."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    name = model.active_adapter if adapter is True else adapter
    adapted = [(path, m) for path, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)]
    if any(type(m) is not LoraLinear or getattr(m, "lora_variant", {}).get(name) or m.lora_bias.get(name)
           for _, m in adapted):
        return False
    targets = dict(plain.named_modules())
    with torch.no_grad():
        for path, m in adapted:
            w = m.get_base_layer().weight
            targets[path].weight.copy_(w + m.get_delta_weight(name) if name in m.lora_A else w)
    return True


def weights_version(model, keep=lambda name: True) -> tuple:
    """Changes whenever any parameter (whose name `keep` accepts) is written in place (optimiser steps, loads) or
    replaced."""
    return tuple((id(p), p.data_ptr(), p._version) for n, p in model.named_parameters() if keep(n))


class PrefixStore:
    """The KV cache of the rows of one generate() call, each under the exact token ids it covers, so that the
    next call's prompt that extends them prefills only its new tokens."""

    def __init__(self, weights: tuple):
        self.weights = weights  # weights_version() when the keys and values were computed
        self.entries: dict[tuple, tuple] = {}  # ids -> (per-layer (K, V) of its batch [b, H, W, D], row, positions)
        self.older: dict[tuple, tuple] = {}  # the call before's rows that this call did not extend (keep_unextended)
        self.lengths: set[int] = set()
        self.extended: set[tuple] = set()  # the stored ids that a later call found as its prompt's prefix

    def keep_unextended(self, previous: PrefixStore) -> None:
        """Also keep the rows of the call before (`previous`) that this call did not extend, for one more call:
        when two players share one adapter setting (the starting buyer against the frozen LLM seller: both are the
        base), their calls alternate, and each finds its own rows two calls back. Older rows are dropped."""
        self.older = {k: v for k, v in previous.entries.items() if k not in previous.extended}
        self.lengths |= {len(k) for k in self.older}

    def add_rows(self, cache, mask, rows: torch.Tensor, sequences: list[list[int]]) -> None:
        """rows [B] (bool) of the batch cache [B, H, W, D] whose mask [B, W] marks the real positions. The leaving
        rows' keys and values are copied once, together; each row keeps an index into them (its real positions),
        and the next call's prefill gathers all rows of such a copy in one indexing per layer (prefill_inputs)."""
        layers = [(k[rows], v[rows]) for k, v, *_ in cache]
        real = mask[rows].bool()                                                                  # [b, W]
        counts = real.sum(1).tolist()
        positions = real.nonzero()[:, 1].split(counts)  # each row's real positions, in order
        for j, (seq, pos) in enumerate(zip(sequences, positions)):
            if len(seq) != len(pos):  # cannot happen while the loop feeds every id but the last
                raise AssertionError(f"KV cache holds {len(pos)} positions for {len(seq)} ids")
            self.entries[tuple(seq)] = (layers, j, pos)
            self.lengths.add(len(seq))

    def longest_prefix(self, prompt: list[int]):
        """(length, (per-layer KV of its batch, its row, its positions)) of the longest stored sequence that is a
        proper prefix of prompt, else None."""
        for n in sorted((n for n in self.lengths if n < len(prompt)), reverse=True):
            key = tuple(prompt[:n])
            kv = self.entries.get(key) or self.older.get(key)
            if kv is not None:
                self.extended.add(key)
                return n, kv
        return None


def prefill_inputs(prompts: list[list[int]], hits: list, pad_id: int, device, num_layers: int, room: int):
    """The first forward's inputs when some prompts have a cached prefix (hits[i] = (n, stored KV) or None):
    each row is [padding | its cached n positions | padding | its new ids], both parts right-aligned, so the
    mask [B, C + S] has holes only on padding and the new ids [B, S] keep their positions n, n+1, ...
    Returns (ids [B, S], mask [B, C + S], positions [B, S], DynamicCache of width C, with room for S + `room`
    more positions in each of its num_layers layers)."""
    cached = [h[0] if h else 0 for h in hits]
    ids, new_mask = left_pad([p[n:] for p, n in zip(prompts, cached)], pad_id)
    positions = ((new_mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(cached)[:, None]) * new_mask
    width = max(cached)
    if width == 0:
        return ids.to(device), new_mask.to(device), positions.to(device), RoomyCache(
            [RoomyLayer(room) for _ in range(num_layers)])
    old_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    # Rows stored from the same batch copy move together, one indexing per layer: (row, position) of this batch
    # <- (row j, stored positions) of that copy
    groups: dict[int, tuple] = {}  # id(copy) -> (the copy, rows here, their n, rows there, their positions)
    for row, (n, hit) in enumerate(zip(cached, hits)):
        if hit:
            copy, j, pos = hit[1]
            _, rows_here, ns, rows_there, stored = groups.setdefault(id(copy), (copy, [], [], [], []))
            rows_here.append(row), ns.append(n), rows_there.append(j), stored.append(pos)
            old_mask[row, width - n:] = 1
    moves = []
    for copy, rows_here, ns, rows_there, stored in groups.values():
        n = torch.tensor(ns)
        start = torch.repeat_interleave(n.cumsum(0) - n, n)                          # each moved position's row start
        within = torch.arange(int(n.sum())) - start                                    # 0..n-1 within its row
        moves.append((copy, torch.repeat_interleave(torch.tensor(rows_here), n),
                      width - torch.repeat_interleave(n, n) + within,                  # right-aligned at `width`
                      torch.repeat_interleave(torch.tensor(rows_there), n), torch.cat(stored)))
    k0, v0 = next(h for h in hits if h)[1][0][0]
    layers = []
    for layer in range(num_layers):
        # the cached part, with room behind it for the new ids and the reply: the forwards write into it in place
        keys = k0.new_zeros((len(prompts), k0.shape[1], width + ids.shape[1] + room, k0.shape[3]))
        values = v0.new_zeros((len(prompts), v0.shape[1], width + ids.shape[1] + room, v0.shape[3]))
        for copy, row, at, row_there, at_there in moves:
            src_k, src_v = copy[layer]
            keys[row, :, at], values[row, :, at] = src_k[row_there, :, at_there], src_v[row_there, :, at_there]
        layers.append(RoomyLayer(room, keys, values, width))
    mask = torch.cat([old_mask, new_mask], dim=1)
    return ids.to(device), mask.to(device), positions.to(device), RoomyCache(layers)


class RoomyCache(DynamicCache):
    """A DynamicCache of RoomyLayers (DynamicCache itself builds only its own layer types)."""

    def __init__(self, layers: list[RoomyLayer]):
        Cache.__init__(self, layers=layers)


class RoomyLayer(DynamicLayer):
    """One layer's KV cache in a buffer with room for `room` more positions: each forward writes its new keys and
    values into the buffer and attends over a view of the filled part, instead of DynamicLayer's torch.cat of the
    whole cache at every decode step (17% of an evaluation's operator time on CPU, and as many fresh allocations).
    The view holds the same numbers in the same order, so attention computes exactly what it did on the copy."""

    def __init__(self, room: int, keys=None, values=None, length: int = 0):
        super().__init__()
        self.room = room
        if keys is not None:
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self.buf_k, self.buf_v, self.length = keys, values, length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if not self.is_initialized:  # no cached prefix: the first forward's keys and values start the buffer
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            shape = key_states.shape[:2] + (n + self.room, key_states.shape[-1])
            self.buf_k, self.buf_v, self.length = key_states.new_zeros(shape), value_states.new_zeros(shape), 0
        elif self.length + n > self.buf_k.shape[-2]:  # out of room (a caller generating past max_tokens): grow
            grow = lambda b: torch.cat([b, b.new_zeros(b.shape[:2] + (n + self.room, b.shape[-1]))], dim=-2)  # noqa
            self.buf_k, self.buf_v = grow(self.buf_k), grow(self.buf_v)
        self.buf_k[:, :, self.length:self.length + n] = key_states
        self.buf_v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.buf_k[:, :, :self.length], self.buf_v[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
            self.keys, self.values = self.buf_k[:, :, :self.length], self.buf_v[:, :, :self.length]


def dedupe(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """(distinct prompts in first-seen order, index into them for every prompt)."""
    index: dict[tuple, int] = {}
    copy_of = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], copy_of


def check_generate_args(prompts, temperature, max_tokens) -> None:
    if not prompts:
        raise ValueError("generate() got no prompts: pass a non-empty list of token-id lists")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate() got an empty prompt: every prompt needs at least one token (the chat template)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative: use 0 (greedy) or a positive value")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-compatible chat completions over HTTP (stdlib only), for sellers served elsewhere.

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # worth another try; any other HTTP error is a caller mistake


class EndpointError(RuntimeError):
    pass


class ChatEndpoint:
    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 retries: int = 5, max_workers: int = 16, backoff_s: float = 1.0):
        self.base = api_base(url)  # ".../v1"
        self.model = model  # the model name the server knows, e.g. "Qwen/Qwen3-30B-A3B-Instruct-2507"
        self.api_key = os.environ.get(api_key_env, "")  # sent as a Bearer token when set
        self.timeout = timeout  # seconds per HTTP request
        self.retries = retries  # extra attempts after the first on timeouts, connection errors, 429 and 5xx
        self.max_workers = max_workers  # concurrent requests for one batch
        self.backoff_s = backoff_s  # first wait; doubles after each failed attempt

    def check(self) -> None:
        """Fail fast, with what to do, when the server is down or does not serve `model`."""
        try:
            listing = self.request("GET", "/models", None, retries=0)
        except EndpointError as e:
            raise EndpointError(f"chat endpoint {self.base} is unreachable ({e}): start the server (e.g. "
                                f"`vllm serve {self.model} --port 8000`) or fix seller.url") from None
        served = [m.get("id") for m in listing.get("data", [])]
        if served and self.model not in served:
            raise EndpointError(f"chat endpoint {self.base} does not serve model {self.model!r}: "
                                f"set seller.model to one of {served}")

    def chat(self, messages_batch: list[list[dict]], *, temperature: float, max_tokens: int) -> list[str]:
        """One assistant reply per conversation, in order; requests run concurrently."""
        def one(messages):
            body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
            reply = self.request("POST", "/chat/completions", body, retries=self.retries)
            return reply["choices"][0]["message"].get("content") or ""

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(one, messages_batch))

    def request(self, method: str, path: str, body: dict | None, *, retries: int) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(retries + 1):
            req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code not in RETRY_STATUS or attempt == retries:
                    raise EndpointError(f"{method} {self.base + path} -> HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == retries:
                    raise EndpointError(f"{method} {self.base + path} failed after {retries + 1} attempts: "
                                        f"{getattr(e, 'reason', e)}") from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")


def api_base(url: str) -> str:
    """'http://host:8000', 'http://host:8000/' or 'http://host:8000/v1' -> 'http://host:8000/v1'."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"seller.url={url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"
