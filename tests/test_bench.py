"""bench/ stays runnable: the environment-only benchmark in a few seconds, its JSON and its table; the TRL row's
equality with our loss; the flat replay behind the rollout limit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_env_quick(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--only", "env", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"run", "env", "memory"}
    env = results["env"]["figures"]
    assert env["episodes"] > 0 and env["episodes_per_s"] > 0 and 3 <= env["mean_rounds"] <= 6
    assert results["run"]["figures"]["quick"] is True
    machine = results["run"]["figures"]["machine"]
    assert "cpu_model" in machine and "cpu_vector_flags" in machine and len(machine["load_average"]) == 3
    assert "[env]" in proc.stdout and "episodes_per_s=" in proc.stdout and "\nmachine: " in proc.stdout


def test_bench_rejects_an_unknown_measurement(tmp_path):
    proc = subprocess.run([sys.executable, "bench/run.py", "--only", "rollout", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown" in proc.stderr and "rollouts" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# The TRL row of the update benchmark: TRL's own loss, checked equal to ours (skipped without the side install)

sys.path.insert(0, str(ROOT / "bench"))
TRL_INSTALL = ("TRL side install absent: pip install --target .venv-bench --no-deps trl==1.16.0 datasets==5.2.0 "
               "pandas==3.1.1 pyarrow==26.0.1 multiprocess==0.70.19 xxhash==4.1.0 (bench/README.md)")


def trl_or_skip():
    import update

    trl = update.import_trl()
    if trl is None:
        pytest.skip(TRL_INSTALL)
    return trl


def test_trl_row_imports_and_its_dataset_is_never_fingerprinted(monkeypatch):
    """What the TRL row needs imports from the side install beside the pinned stack. datasets fingerprints a new
    Dataset by pickling it with dill, which fails on pyarrow's MonthDayNano when the side install lies outside the
    venv's prefix (issue 14): the TRL row must not depend on where that is."""
    trl = trl_or_skip()  # importing GRPOTrainer (transformers' Trainer stack) is most of this file's time: ~10 s
    import datasets.arrow_dataset

    assert trl.__version__ == "1.16.0" and trl.GRPOConfig and trl.GRPOTrainer.compute_loss
    assert trl.GRPOTrainer._get_per_token_logps_and_entropies  # the private method update.trl_update calls

    import update

    def fail(dataset):
        raise AssertionError("the placeholder dataset was fingerprinted")

    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", fail)
    assert len(update.placeholder_dataset(8)) == 8


def test_trl_row_runs_and_matches_ours(tiny_model_dir, tmp_path):
    """The TRL row end to end on 4 puppet episodes of the tiny model: GRPOTrainer built as bench/run.py builds it,
    its loss and gradient equal to train.py's (update.check_equal raises otherwise), then one timed-path update."""
    trl = trl_or_skip()
    import copy

    import harness
    import rollouts
    import update
    from engine import HFEngine

    cfg, _ = harness.load_bench_config(None, ["rollout.products_per_step=2", "rollout.group_size=2"])
    policy, tokenizer = harness.load_bench_policy(tiny_model_dir, cfg)
    scenarios = harness.step_scenarios(harness.train_scenarios(cfg), 2, 2)
    games = rollouts.rollout_batched(HFEngine(policy, tokenizer), cfg, scenarios, seed=0)["games"]
    convs, adv = update.recorded_batch(games, cfg.rollout.group_size)
    trl_model = copy.deepcopy(policy)
    trainer = update.make_trl_trainer(trl, trl_model, tokenizer, cfg, len(convs), str(tmp_path))
    batch = update.TRLBatch(convs, adv, tokenizer.pad_token_id, 2)
    check = update.check_equal(policy, trl_model, trainer, convs, adv, cfg, tokenizer.pad_token_id, batch)
    assert check["trl_loss_diff"] <= 1e-5 and check["trl_grad_rel_diff"] <= 1e-4
    out = update.trl_update(trainer, trl_model, update.adamw(trl_model, cfg), batch, cfg.train.grad_clip)
    assert out["grad_norm"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The rollout limit: a lockstep run's requests replayed flat, the same tokens


@pytest.fixture(scope="module")
def bench_policy(tiny_model_dir):
    import harness

    cfg, _ = harness.load_bench_config(None, ["rollout.products_per_step=2", "rollout.group_size=2"])
    policy, tokenizer = harness.load_bench_policy(tiny_model_dir, cfg)
    return cfg, policy, tokenizer


@pytest.mark.parametrize("kind", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])  # vLLM: ~20 s to start here
def test_flat_replay_generates_exactly_the_lockstep_tokens(kind, bench_policy, tiny_model_dir):
    import harness
    import rollouts
    from engine import HFEngine

    cfg, policy, tokenizer = bench_policy
    if kind == "hf":
        engine = HFEngine(policy, tokenizer)
    else:
        pytest.importorskip("vllm")
        from vllm_engine import VLLMEngine

        engine = VLLMEngine(tiny_model_dir, tokenizer, sync_strategy="adapter", dtype="float32", max_model_len=1024,
                            max_lora_rank=cfg.model.lora_r, enforce_eager=True)
        engine.sync(policy)
    scenarios = harness.step_scenarios(harness.train_scenarios(cfg), 2, 2)
    run = rollouts.rollout_batched(engine, cfg, scenarios, seed=None if kind == "vllm" else 0)
    assert sum(r.reply_tokens for r in run["requests"]) == run["tokens"] > 0
    buyer = [r for r in run["requests"] if r.adapter]   # the CPU default's seller is the LLM too (adapter off)
    assert len(buyer) == sum(g.outcome.rounds for g in run["games"])  # one buyer reply per round
    assert len(run["requests"]) - len(buyer) == sum(g.outcome.seller_replies for g in run["games"])
    flat = rollouts.rollout_flat(engine, run["requests"], seed=None)
    assert flat["tokens"] == run["tokens"] and flat["requests"] == len(run["requests"])
    # lengths are forced, whatever the model samples: 1 and 5 tokens, never more, never fewer
    short = [harness.Request(r.prompt, n, True, 1.0) for r, n in zip(run["requests"], (1, 5))]
    assert rollouts.rollout_flat(engine, short, seed=None)["tokens"] == 6


def test_seller_families_room_on_a_few_products(scenarios, monkeypatch):
    """bench/seller_families.py on 4 train and 4 held-out products: the teachers, the searched best schedule and the
    best g and h endings come back as rewards, and the search's choice is a 6-round ladder schedule."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import seller_families
    monkeypatch.setattr(seller_families, "EPISODES_PER_PRODUCT", 1)
    r = seller_families.family_room("mixed:0.5", scenarios[:4], scenarios[4:8])
    assert r["family"] == "mixed:0.5" and len(r["best_schedule"]) == 6
    assert all(-1 <= r[k] <= 1 for k in ("teachers", "best", "best_g", "best_h"))
    end = r["best_schedule"][-1]
    if end in (6, 7):   # the best schedule is also the best of its ending: the same schedule, the same episodes
        assert r["best_g" if end == 6 else "best_h"] == r["best"]


def test_last_bids_table_behind_the_graded_view(monkeypatch):
    """bench/last_bids.py on the train products: the claims env.ASK_HIGH (1.05) rests on. Against the linear family
    (what the LLM seller imitates) a last bid hardly pays once the round-5 ask is beyond ASK_HIGH x the budget; the
    hard-liner plays most of its games there, and h is its worst last bid there. Between 1.05 and 1.1 x the budget
    (inside "over" at the first threshold, 1.1) the linear family pays little and the boulware rewards f over h."""
    import data
    import env
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import last_bids
    assert env.ASK_HIGH == 1.05
    train, _ = data.split_scenarios(data.load_scenarios(), seed=0)
    linear, hardliner = last_bids.last_bid_values("linear:1.0", train), last_bids.last_bid_values("hardliner:0.5", train)
    assert sum(row["share"] for row in linear.values()) == pytest.approx(1.0)
    assert max(linear["high"][b] for b in last_bids.BIDS) < 0.05
    assert linear["over"]["h"] > linear["over"]["g"]   # the training seller rewards h just over the rungs
    assert hardliner["high"]["share"] > 0.95
    assert min(hardliner["high"][b] for b in last_bids.BIDS) == hardliner["high"]["h"]
    band = "<= 1.1 x budget"
    linear_bands = last_bids.last_bid_values("linear:1.0", train, last_bids.band_of)
    boulware_bands = last_bids.last_bid_values("boulware:0.5", train, last_bids.band_of)
    assert sum(row["share"] for row in boulware_bands.values()) == pytest.approx(1.0)
    assert max(linear_bands[band][b] for b in last_bids.BIDS) < 0.1
    assert boulware_bands[band]["f"] > boulware_bands[band]["h"] and boulware_bands[band]["share"] > 0.1
