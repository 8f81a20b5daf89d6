"""memory_plan.py: parameter counts of the real Qwen3-30B-A3B architecture (meta device) against hand-worked
numbers, vLLM's LoRA buffers, the loading peak and the node's host memory, the plan verdicts, train.py's host-memory
check, the command line, and FSDP2 sharding of a peft model over 2 CPU processes (gloo) with the weight-sync
helpers of vllm_engine.py gathering the shards."""
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
    assert chosen["vLLM weights (bf16)"] == sum(groups.values()) * 2 / 2  # bf16, half per GPU at TP 2
    # KV per token per GPU with TP 2: 48 layers * (K, V) * 2 of 4 kv heads * 128 * 2 bytes = 49,152
    assert mp.kv_bytes_per_token(arch, 2) == 49_152


def test_vllm_lora_buffers_of_qwen3_30b_a3b(qwen30b):
    arch = mp.Arch.of(qwen30b)
    assert (arch.experts, arch.moe_intermediate) == (128, 768)
    # vLLM 0.32 FusedMoEWithLoRA, max_loras=1, rank 16, TP 2 (intermediate 768 / 2 = 384), per layer:
    #   w13 A 2 x 128 x 16 x 2048 = 8,388,608   w13 B 2 x 128 x 384 x 16 = 1,572,864
    #   w2  A     128 x 16 x 384  =   786,432   w2  B     128 x 2048 x 16 = 4,194,304   sum 14,942,208
    # x 48 layers x 2 bytes = 1,434,451,968 B = 1.336 GiB (the plan used to assume ~0.6 GiB: the adapter / TP)
    tp2 = mp.vllm_lora_buffer_bytes(arch, rank=16, tp=2)
    assert tp2["experts"] == 1_434_451_968
    # dense, per layer: qkv A 3 x 16 x 2048 = 98,304; qkv B (4096/2 + 2 x 512/2) x 16 = 40,960;
    #   o_proj A 16 x 4096/2 = 32,768; o_proj B 2048 x 16 = 32,768; router A 16 x 2048 + B 128 x 16 = 34,816
    #   = 239,616 x 48 = 11,501,568; embed_tokens + lm_head 2 x (151,936 + 2048) x 16 = 4,927,488
    #   (11,501,568 + 4,927,488) x 2 bytes = 32,858,112
    assert tp2["dense"] == 32_858_112
    # TP 1: only w13 B and w2 A grow (the intermediate is not split): 8,388,608 + 3,145,728 + 1,572,864 + 4,194,304
    #   = 17,301,504 x 48 x 2 = 1,660,944,384
    assert mp.vllm_lora_buffer_bytes(arch, rank=16, tp=1)["experts"] == 1_660_944_384
    assert mp.vllm_lora_buffer_bytes(arch, rank=16, tp=2, max_loras=2)["experts"] == 2 * 1_434_451_968
    assert mp.vllm_lora_rank(16) == 16 and mp.vllm_lora_rank(12) == 16 and mp.vllm_lora_rank(2) == 8


# config.yaml's LoRA (attention + fused experts, r=16): attention 13,369,344 + experts 48 x 16 x 128 x
# ((2048 + 1536) + (768 + 2048)) = 629,145,600 -> 642,514,944 trainable; the bf16 adapter file 1,285,029,888 B
CONFIG_YAML_LORA = 642_514_944


def test_loading_peak_and_host_memory_of_the_chosen_plan(qwen30b):
    groups, arch = mp.parameter_groups(qwen30b), mp.Arch.of(qwen30b)
    plan = {p.name: p for p in mp.CANDIDATES}[mp.CHOSEN]
    gpu = mp.plan_rows(plan, groups, CONFIG_YAML_LORA, arch, mp.Hardware(), mp.Workload(), vllm_rank=16)
    # loading: the whole bf16 model 30,532,122,624 x 2 + LoRA fp32 642,514,944 x 4 + 4 GiB reserve
    #   = 61,064,245,248 + 2,570,059,776 + 4,294,967,296 = 67,929,272,320 B (63.3 GiB)
    assert gpu["= loading (whole model, before sharding)"] == 67_929_272_320
    assert mp.fits(gpu, mp.Hardware()) and not mp.fits(gpu, mp.Hardware(gpu_gib=63.0))  # loading is the peak
    host = mp.host_rows(plan, gpu, CONFIG_YAML_LORA, ranks=8)
    # sleep: 8 x (vLLM weights 30,532,122,624 + LoRA buffers 1,434,451,968 + 32,858,112) = 255,995,461,632 (238.4 GiB)
    assert host["sleep level 1: pinned copy of vLLM weights + LoRA"] == 255_995_461_632
    # sync: 8 x 1,285,029,888 for the CPU state dict, for vLLM's copy, and in /dev/shm (one file per rank:
    # the served adapter's files go before the new ones are written)
    assert host["sync: adapter state dict on the CPU"] == 10_280_239_104
    assert host["sync: vLLM's pinned copy of the adapter"] == 10_280_239_104
    assert host["sync: /dev/shm adapter files"] == 10_280_239_104
    # 255,995,461,632 + 3 x 10,280,239,104 = 286,836,178,944 (267.1 GiB)
    assert host["= host RAM at a sync"] == 286_836_178_944
    awake = mp.host_rows(mp.Plan("awake", "fsdp2", "bf16", 2, sleep=False), gpu, CONFIG_YAML_LORA, ranks=8)
    assert awake["sleep level 1: pinned copy of vLLM weights + LoRA"] == 0
    no_adapter = mp.host_rows(plan, gpu, CONFIG_YAML_LORA, ranks=8, adapter_sync=False)  # sync_strategy=merged
    assert no_adapter["= host RAM at a sync"] == 255_995_461_632


def test_host_memory_need_of_config_yaml():
    from config import load_config

    cfg = load_config(str(ROOT / "config.yaml"))
    need = mp.host_memory_need(cfg, ranks_per_node=8, cuda=True)  # the same numbers as the test above, from the file
    assert need["= host RAM at a sync"] == 286_836_178_944
    assert need["sync: /dev/shm adapter files"] == 10_280_239_104
    assert mp.host_memory_need(load_config(str(ROOT / "config.yaml"), ["engine.kind=hf"]), 8, cuda=True) == {}


def test_host_memory_verdict():
    gib = mp.GIB
    need = {"sleep level 1: pinned copy of vLLM weights + LoRA": 200 * gib,
            "sync: adapter state dict on the CPU": 5 * gib, "sync: vLLM's pinned copy of the adapter": 5 * gib,
            "sync: /dev/shm adapter files": 10 * gib, "= host RAM at a sync": 220 * gib}
    line = mp.host_memory_verdict(need, ram_available=230 * gib, shm_free=50 * gib)
    assert line.startswith("host memory: about 220 GiB of RAM") and "230 GiB available" in line
    with pytest.raises(mp.HostMemoryError, match=r"about 220 GiB .* only 219 GiB is available .*engine\.sleep=false"):
        mp.host_memory_verdict(need, ram_available=219 * gib, shm_free=50 * gib)
    # Docker's default 64 MB /dev/shm: the adapters go to disk, so RAM needs 220 - 10 = 210 GiB, and a notice
    line = mp.host_memory_verdict(need, ram_available=215 * gib, shm_free=64 * 2**20)
    assert "about 210 GiB" in line and "0.06 GiB free" in line and "--shm-size=11g" in line
    assert "about 210 GiB" in mp.host_memory_verdict(need, ram_available=215 * gib, shm_free=None)  # no /dev/shm
    assert mp.host_memory_verdict({}, ram_available=1.0, shm_free=None) == ""  # not a vLLM run


def test_check_host_memory_reads_this_machine(tiny_moe_dir, tmp_path, monkeypatch):
    from config import load_config

    cfg = load_config(None, [f"model.name={tiny_moe_dir}", "engine.kind=vllm", "model.dtype=float32"])
    ram, source = mp.available_ram()
    assert ram > 0 and ("MemAvailable" in source or "limit" in source)
    (tmp_path / "meminfo").write_text("MemTotal: 999 kB\nMemAvailable: 1000000 kB\n")  # 1,024,000,000 bytes
    (tmp_path / "memory.max").write_text("600000000\n")  # a container limited to 600 MB, 400 MB used of which
    (tmp_path / "memory.current").write_text("400000000\n")  # 100 MB is reclaimable page cache: 300 MB left
    (tmp_path / "memory.stat").write_text("anon 300000000\ninactive_file 100000000\n")
    ram, source = mp.available_ram(str(tmp_path / "meminfo"), str(tmp_path))
    assert ram == 600_000_000 - 400_000_000 + 100_000_000 and "memory.max" in source
    (tmp_path / "memory.max").write_text("max\n")  # no limit: MemAvailable
    ram, source = mp.available_ram(str(tmp_path / "meminfo"), str(tmp_path))
    assert ram == 1_024_000_000 and source == f"MemAvailable in {tmp_path}/meminfo"
    assert mp.available_ram(str(tmp_path / "missing"))[0] is None
    assert mp.shm_free_bytes(str(tmp_path)) > 0 and mp.shm_free_bytes(str(tmp_path / "missing")) is None
    assert mp.check_host_memory(cfg, ranks_per_node=2, cuda=False).startswith("host memory: about 0 GiB")
    monkeypatch.setattr(mp, "available_ram", lambda: (1024.0, "MemAvailable in /proc/meminfo"))
    with pytest.raises(mp.HostMemoryError, match="only 0 GiB is available"):
        mp.check_host_memory(cfg, ranks_per_node=2, cuda=False)
    assert mp.check_host_memory(load_config(None, [f"model.name={tiny_moe_dir}"]), 2) == ""  # engine.kind=hf


def test_command_line_with_a_training_config(tiny_moe_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {tiny_moe_dir}\n  lora_r: 4\n  lora_target_parameters: [mlp.experts.down_proj]\n"
                   f"train:\n  micro_batch_tokens: 64\n")
    report = mp.main([str(cfg), "--gpus", "2", "--kv-cache-gib", "0.5"])
    assert "fsdp2-bf16" in report and "['mlp.experts.down_proj']" in report and "2 x 79.6 GiB" in report
    assert "micro-batch 64 tokens" in report and "engine.gpu_memory_utilization=" in report
    assert "GiB per node, host (2 ranks)" in report and "/dev/shm needed" in report
    assert "= loading (whole model, before sharding)" in report and "vLLM LoRA buffers (max_loras=1)" in report
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


def test_selfplay_plan_counts_two_adapters_and_every_lora_slot(qwen30b):
    """configs/selfplay-30b.yaml: the seller's adapter doubles LoRA weights, gradients and AdamW state (sharded
    over 8 GPUs), and vLLM holds 2 + 2 x 3 snapshot slots of LoRA buffers; the chosen plan still fits."""
    import config
    cfg = config.load_config(str(ROOT / "configs" / "selfplay-30b.yaml"))
    cfg.validate(8)
    work = mp.Workload(**mp.workload_of(cfg))
    assert (work.adapters, work.max_loras, work.micro_batch_tokens) == (2, 8, 4096)
    groups, arch = mp.parameter_groups(qwen30b), mp.Arch.of(qwen30b)
    plan = {p.name: p for p in mp.CANDIDATES}[mp.CHOSEN]
    one = mp.plan_rows(plan, groups, CONFIG_YAML_LORA, arch, mp.Hardware(), mp.Workload(), vllm_rank=16)
    two = mp.plan_rows(plan, groups, CONFIG_YAML_LORA, arch, mp.Hardware(), work, vllm_rank=16)
    for key in ("LoRA weights (fp32)", "LoRA gradients (fp32)", "AdamW state (fp32 m, v)"):
        assert two[key] == 2 * one[key]
    assert two["AdamW state (fp32 m, v)"] == 2 * CONFIG_YAML_LORA * 8 / 8   # m and v in fp32, over 8 GPUs
    assert two["vLLM LoRA buffers (max_loras=8)"] == 8 * one["vLLM LoRA buffers (max_loras=1)"]
    assert mp.fits(two, mp.Hardware())
    host = mp.host_rows(plan, two, CONFIG_YAML_LORA, ranks=8, adapters=2, max_loras=8)
    assert host["sync: /dev/shm adapter files"] == 8 * 2 * CONFIG_YAML_LORA * 2   # both sides' bf16 files per rank
    assert host["sync: vLLM's pinned copy of the adapter"] == 8 * 8 * CONFIG_YAML_LORA * 2
    assert mp.gpu_memory_utilization(two, mp.Hardware()) <= cfg.engine.gpu_memory_utilization
