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
