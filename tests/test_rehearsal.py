"""The dress rehearsal of config.yaml (rehearsal.py): the production configuration itself on 2 CPU processes,
with only the model (a tiny Qwen3-MoE with fused experts), the world and the sizes swapped out. Every phase a CPU
can run must run; the three it cannot (vLLM generation and probe scoring through the MoE LoRA engine, which need
Triton, and CUDA-only sleep mode) must be named as such. Before the expert-LoRA fix it failed at the first sync."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_config_yaml_rehearsal_runs_every_phase_a_cpu_can(tmp_path):
    pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, str(ROOT / "rehearsal.py"), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-3000:]
    assert "rehearsal: every phase this machine can run ran" in out
    result = json.loads((tmp_path / "rehearsal.json").read_text())
    status = {key: rec["status"] for key, rec in result["phases"].items()}
    assert result["ok"]
    if result["cuda"]:  # with 2 GPUs nothing is skipped
        assert set(status.values()) == {"ran"}, result["phases"]
        return
    for key in ("config", "data", "model", "fsdp2", "engine", "rng", "sync", "rollout", "update", "resync",
                "checkpoint", "resume", "eval"):
        assert status[key] == "ran", (key, result["phases"][key])
    for key in ("vllm_rollout", "probe", "sleep"):  # what a CPU cannot run, with the reason
        assert status[key] == "not run" and "not run on CPU" in result["phases"][key]["detail"], key
    assert "needs Triton" in result["phases"]["probe"]["detail"]
    assert "expert LoRA-B gradients non-zero" in result["phases"]["update"]["detail"]
    assert "no deal below cost" in result["phases"]["rollout"]["detail"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 2 came from the resumed launch


@pytest.mark.slow
def test_selfplay_30b_config_rehearsal_trains_both_sides(tmp_path):
    """configs/selfplay-30b.yaml the same way (90 s): FSDP2 over 2 ranks with both adapters, vLLM at tensor
    parallel 2 serving them and the snapshots; the buyer learns in step 1, the seller (expert LoRA included) in
    the resumed step 2, against the buyer's snapshot; the final cross-play table."""
    pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, str(ROOT / "rehearsal.py"), "--config", str(ROOT / "configs" /
                        "selfplay-30b.yaml"), "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert r.returncode == 0 and "rehearsal: every phase this machine can run ran" in r.stdout, \
        r.stdout[-4000:] + r.stderr[-3000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["grad_norm"] > 0 and metrics[1]["seller/grad_norm"] > 0
    assert metrics[1].get("league/buyer_snapshot", 0) + metrics[1].get("league/buyer_base", 0) + \
        metrics[1].get("league/buyer_current", 0) + metrics[1].get("league/buyer_scripted", 0) == pytest.approx(1.0)
    assert (tmp_path / "run" / "step_000002" / "seller_adapter" / "adapter_config.json").exists()
    cross = json.loads((tmp_path / "run" / "final_eval.json").read_text())["crossplay"]
    assert cross["sellers"][:3] == ["base", "scripted:family", "trained seller"] and cross["below_cost_deals"] == 0
