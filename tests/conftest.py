"""Shared fixtures. Tests read the dataset from ../shared (or $NEGO_DATA); they never download it."""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "AmazonHistoryPrice"
if "NEGO_DATA" not in os.environ and SHARED_DATA.exists():
    os.environ["NEGO_DATA"] = str(SHARED_DATA)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM engine: ~2 s start on CPU
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def scenarios():
    import data
    return data.load_scenarios()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random dense Qwen3 (2 layers, hidden 64, head_dim 32) + a tokenizer trained on protocol-like text,
    built once per test session (~2 s). Loadable offline by transformers and vLLM-cpu."""
    import model
    return model.build_tiny_model(str(tmp_path_factory.mktemp("tiny_qwen3")), model.synthetic_texts())


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """The same with Qwen3-MoE blocks (4 experts, top-2) whose experts are fused 3-D parameters."""
    import model
    return model.build_tiny_moe_model(str(tmp_path_factory.mktemp("tiny_qwen3_moe")), model.synthetic_texts())
