"""Rollouts of one GRPO step: the lockstep batched runner (env.play) on vLLM and on the HF engine, against the
naive way a user would write it (one episode at a time, each reply from `model.generate`) and against the limit
of the same engine (`rollout_flat`: the lockstep run's requests again, all at once, nothing waiting on anything).

All of them play the same episodes with the same decisions (harness.Puppet), so they generate the same number of
replies of the same lengths; only the way generation is organised differs. The naive way is timed on a strided
subset of the step's episodes (its time per episode does not depend on how many there are) and both rates are
reported per episode and per generated token. The flat replay generates exactly the lockstep run's tokens (it
checks), so lockstep seconds / flat seconds is the share of the engine's throughput the multi-turn runner keeps:
what per-episode asynchronous generation could win back at most.
"""
from __future__ import annotations

import time

import env
from harness import CountingEngine, make_players, scripted_buyer, scripted_seller, ScriptView


def rollout_batched(engine, cfg, scenarios, seed: int = 0) -> dict:
    """One step's episodes through env.play, all pending replies of a turn in one generate() call."""
    counting = CountingEngine(engine)
    buyer, seller = make_players(cfg, counting, seed)
    start = time.perf_counter()
    games = env.play(scenarios, buyer, seller, max_rounds=cfg.rollout.max_rounds)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "episodes": len(games), "tokens": counting.tokens,
            "generate_seconds": counting.seconds, "generate_calls": counting.calls,
            "rounds": sum(g.outcome.rounds for g in games), "games": games, "requests": counting.requests}


# ---------------------------------------------------------------------------------------------------------------
# The limit: the same requests with nothing waiting on anything


def rollout_flat(engine, requests, seed: int | None = 0) -> dict:
    """Every reply of a lockstep rollout (`requests`, recorded by harness.CountingEngine) generated again as
    independent requests, all submitted at once: the same prompts, each reply forced to its recorded length.
    What the engine does with the step's tokens when no turn waits for the previous one; one call per role
    (buyer and seller requests never share a vLLM batch, see vllm_engine.py), on HF one per reply length too."""
    from engine import HFEngine

    groups: dict[tuple, list] = {}
    for r in requests:
        groups.setdefault((r.adapter, r.temperature), []).append(r)
    flat = flat_hf if isinstance(engine, HFEngine) else flat_vllm
    start = time.perf_counter()
    tokens = sum(flat(engine, rs, adapter, temperature, seed) for (adapter, temperature), rs in groups.items())
    seconds = time.perf_counter() - start
    expected = sum(r.reply_tokens for r in requests)
    if tokens != expected:
        raise AssertionError(f"the flat replay generated {tokens} tokens, the lockstep rollout {expected}")
    return {"seconds": seconds, "tokens": tokens, "requests": len(requests)}


def flat_vllm(engine, requests, adapter: bool, temperature: float, seed) -> int:
    """One LLM.generate call on the engine's own vLLM instance and adapter, min_tokens = max_tokens = the recorded
    length. VLLMEngine.generate is bypassed only for its CPU chunking (prompts cut to one step's prefill budget,
    needed for seeded requests; these are unseeded on CPU): here the scheduler sees every request at once."""
    target = engine.seller if not adapter and engine.sync_strategy == "merged" else engine
    params = []
    for i, r in enumerate(requests):
        p = target.sampling_params(temperature, r.reply_tokens, None if seed is None else seed + i)
        p.min_tokens = r.reply_tokens  # no early stop: exactly the recorded length
        params.append(p)
    outs = target.llm.generate([{"prompt_token_ids": r.prompt} for r in requests], params,
                               lora_request=target.lora_request if adapter else None, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs)


def flat_hf(engine, requests, adapter: bool, temperature: float, seed) -> int:
    """HFEngine.generate with no stop ids, one call per recorded reply length (its max_tokens is per call)."""
    import copy

    nonstop = copy.copy(engine)
    nonstop.stop_ids = [-1]  # an id the model never samples: every row runs to max_tokens
    by_length: dict[int, list[list[int]]] = {}
    for r in requests:
        by_length.setdefault(r.reply_tokens, []).append(r.prompt)
    return sum(len(g.token_ids) for n, prompts in by_length.items()
               for g in nonstop.generate(prompts, temperature=temperature, max_tokens=n, adapter=adapter, seed=seed))


# ---------------------------------------------------------------------------------------------------------------
# The naive way


def hf_generate(model, tokenizer, messages, *, temperature, max_tokens, adapter, stop_ids, pad_id) -> tuple[str, int]:
    """One reply with transformers' generate, the history re-rendered by the chat template: (text, new tokens)."""
    import torch
    from contextlib import nullcontext

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    off = model.disable_adapter() if not adapter else nullcontext()
    with off, torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                             **sampling)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in stop_ids:
            new = new[:i + 1]
            break
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def naive_episode(model, tokenizer, cfg, scenario, index: int, stop_ids, pad_id) -> tuple[int, int]:
    """One episode, reply by reply, with the same scripted decisions as the batched runs: (rounds, tokens)."""
    r, s = cfg.rollout, cfg.seller
    game = env.Game(env.Negotiation(scenario, r.max_rounds), index=index)
    buyer_script, seller_script = scripted_buyer(), scripted_seller(cfg)
    seller_shadow = ScriptView(game, {})
    buyer_msgs = env.buyer_opening(scenario, r.style, r.description_chars)
    seller_msgs = None
    persona = env.load_persona(s.persona) if s.kind == "llm" and s.persona else ""
    tokens = 0
    while not game.done:
        text, n = hf_generate(model, tokenizer, buyer_msgs, temperature=r.buyer_temperature,
                              max_tokens=r.buyer_max_tokens, adapter=True, stop_ids=stop_ids, pad_id=pad_id)
        tokens += n
        buyer_msgs.append({"role": "assistant", "content": text})
        game.negotiation.buyer_says(buyer_script.reply([game])[0])
        if game.done:
            break
        if s.kind == "llm":
            message = game.negotiation.last_relayed()
            if seller_msgs is None:
                seller_msgs = env.seller_opening(scenario, message, persona, r.style, r.description_chars)
            else:
                seller_msgs.append({"role": "user", "content": message})
            text, n = hf_generate(model, tokenizer, seller_msgs, temperature=s.temperature, max_tokens=s.max_tokens,
                                  adapter=False, stop_ids=stop_ids, pad_id=pad_id)
            tokens += n
            seller_msgs.append({"role": "assistant", "content": text})
        game.negotiation.seller_says(seller_script.reply([seller_shadow])[0])
        if not game.done:
            buyer_msgs.append({"role": "user", "content": game.negotiation.last_relayed()})
    return game.outcome.rounds, tokens


def rollout_naive(model, tokenizer, cfg, scenarios, n_episodes: int, seed: int = 0) -> dict:
    """`n_episodes` of the step's episodes, evenly strided, one after another."""
    import torch

    from engine import stop_token_ids

    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    stride = max(1, len(scenarios) // n_episodes)
    picks = list(range(0, len(scenarios), stride))[:n_episodes]
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    rounds = tokens = 0
    for i in picks:
        r, t = naive_episode(model, tokenizer, cfg, scenarios[i], i, stop_ids, pad_id)
        rounds, tokens = rounds + r, tokens + t
    seconds = time.perf_counter() - start
    model.train(was_training)
    return {"seconds": seconds, "episodes": len(picks), "tokens": tokens, "rounds": rounds}


def rates(run: dict) -> dict:
    return {"episodes_per_s": run["episodes"] / run["seconds"], "tokens_per_s": run["tokens"] / run["seconds"],
            "seconds_per_episode": run["seconds"] / run["episodes"],
            "mean_rounds": run["rounds"] / run["episodes"], "tokens_per_episode": run["tokens"] / run["episodes"]}
