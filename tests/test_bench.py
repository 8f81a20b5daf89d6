"""bench/run.py stays runnable: the environment-only benchmark in a few seconds, its JSON and its table."""
import json
import subprocess
import sys
from pathlib import Path

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
    assert "[env]" in proc.stdout and "episodes_per_s=" in proc.stdout


def test_bench_rejects_an_unknown_measurement(tmp_path):
    proc = subprocess.run([sys.executable, "bench/run.py", "--only", "rollout", "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown" in proc.stderr and "rollouts" in proc.stderr
