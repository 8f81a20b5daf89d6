"""memory_plan.py: parameter counts of the real Qwen3-30B-A3B architecture (meta device) against hand-worked
numbers, the plan verdicts, the command line, and FSDP2 sharding of a peft model over 2 CPU processes (gloo)
with the weight-sync helpers of vllm_engine.py gathering the shards."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memory_plan as mp
from model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen30b():
    return mp.meta_model(mp.QWEN3_30B_A3B_NAME)


def test_parameter_groups_of_qwen3_30b_a3b(qwen30b):
    groups = mp.parameter_groups(qwen30b)
    # experts: 48 layers * 128 experts * (gate 768x2048 + up 768x2048 + down 2048x768) = 48*128*3*1,572,864
    assert groups["experts"] == 28_991_029_248
    # attention per layer: q 2048x4096 + k 2048x512 + v 2048x512 + o 4096x2048 = 18,874,368; x 48
    assert groups["linear"] == 905_969_664
    # untied embed_tokens and lm_head: 2 * 151,936 * 2048
    assert groups["embeddings"] == 622_329_856
    # router 48 * 128 * 2048 = 12,582,912; norms 48 * (2*2048 + 2*128) + 2048 = 210,944
    assert groups["other"] == 12_793_856
    assert sum(groups.values()) == pytest.approx(30.5e9, rel=0.005)  # the model card's 30.5 B


def test_lora_count_for_attention_targets(qwen30b):
    cfg = ModelConfig(name=mp.QWEN3_30B_A3B_NAME, lora_r=16)
    # r * (in + out) per projection: 16 * ((2048+4096) + (2048+512) + (2048+512) + (4096+2048)) = 278,528; x 48
    assert mp.lora_numel(mp.meta_model(mp.QWEN3_30B_A3B_NAME), cfg) == 13_369_344


def test_bitsandbytes_qlora_does_not_fit_and_the_chosen_plan_does(qwen30b):
    groups, arch = mp.parameter_groups(qwen30b), mp.Arch.of(qwen30b)
    hw, work = mp.Hardware(), mp.Workload()
    plans = {p.name: p for p in mp.CANDIDATES}
    qlora = mp.plan_rows(plans["qlora-ddp"], groups, 13_369_344, arch, hw, work)
    # only the 0.906 B attention weights are 4-bit; 29.6 B stay bf16 on every GPU
    bf16_rest = (groups["experts"] + groups["embeddings"] + groups["other"]) * 2
    assert qlora["base weights (trainer)"] == pytest.approx(bf16_rest + groups["linear"] * mp.NF4_BYTES_PER_PARAM)
    assert not mp.fits(qlora, hw)
    chosen = mp.plan_rows(plans[mp.CHOSEN], groups, 13_369_344, arch, hw, work)
    assert mp.fits(chosen, hw)
    assert chosen["base weights (trainer)"] == pytest.approx(sum(groups.values()) * 2 / 8)  # bf16 / 8 ranks
    assert chosen["vLLM weights (bf16 + LoRA slot)"] == pytest.approx((sum(groups.values()) + 13_369_344) * 2 / 2)
    # KV per token per GPU with TP 2: 48 layers * (K, V) * 2 of 4 kv heads * 128 * 2 bytes = 49,152
    assert mp.kv_bytes_per_token(arch, 2) == 49_152


def test_command_line_with_a_training_config(tiny_moe_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_moe_dir}\n  lora_r: 4\n  lora_target_parameters: [mlp.experts.down_proj]\n"
                   f"train:\n  micro_batch_tokens: 64\n")
    report = mp.main([str(cfg), "--gpus", "2", "--kv-cache-gib", "0.5"])
    assert "fsdp2-bf16" in report and "['mlp.experts.down_proj']" in report and "2 x 79.6 GiB" in report
    assert "micro-batch 64 tokens" in report and "engine.gpu_memory_utilization=" in report
    assert "micro-batch 32 tokens" in mp.main([str(cfg), "--micro-batch-tokens", "32"])  # the flag wins
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  name: {tiny_moe_dir}\n  lora_rank: 4\n")
    with pytest.raises(ValueError, match="lora_r"):
        mp.main([str(bad)])
    with pytest.raises(ValueError, match="local folder"):
        mp.meta_model("someone/unknown-model")


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    import memory_plan, model as M
    from vllm_engine import adapter_state_dict, merged_hf_weights
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same LoRA init on both ranks
    m, _ = M.load_policy(M.ModelConfig(name=sys.argv[1], dtype="float32", lora_r=8, lora_alpha=16), verbose=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.tensor([[5, 17, 99, 3, 42, 7, 300, 12]]) + dist.get_rank()  # a different micro-batch per rank
    losses = []
    for r in range(2):  # the unsharded gradient averaged over both ranks' micro-batches, by hand
        xr = torch.tensor([[5, 17, 99, 3, 42, 7, 300, 12]]) + r
        (m(input_ids=xr, labels=xr).loss / 2).backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    want_merged = dict(merged_hf_weights(m, dtype=torch.float32))
    want_adapter = adapter_state_dict(m)
    m.zero_grad(set_to_none=True)
    full = sum(p.numel() for p in m.parameters())
    memory_plan.shard_with_fsdp2(m)
    m(input_ids=x, labels=x).loss.backward()  # FSDP2 reduce-scatter averages over the ranks
    grad_gap = max((p.grad.full_tensor() - want[n]).abs().max().item()
                   for n, p in m.named_parameters() if p.requires_grad)
    merged = dict(merged_hf_weights(m, dtype=torch.float32))
    adapter = adapter_state_dict(m)
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out = dict(full=full, local=sum(p.to_local().numel() for p in m.parameters()), grad_gap=grad_gap,
               merged_same=same(merged, want_merged), adapter_same=same(adapter, want_adapter))
    json.dump(out, open(sys.argv[2] + f"/rank{dist.get_rank()}.json", "w"))
    dist.destroy_process_group()
""")


def test_fsdp2_sharding_on_two_cpu_processes(tiny_model_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           tiny_model_dir, str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, so a hang is cleaned up whole
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["local"] * 2 == out["full"]  # each rank holds half of every parameter
        assert out["grad_gap"] < 1e-6  # gradients equal the unsharded, rank-averaged ones
        assert out["merged_same"] and out["adapter_same"]  # the weight sync sees whole tensors
