"""Shared fixtures. Tests read the dataset from ../shared (or $NEGO_DATA); they never download it."""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "AmazonHistoryPrice"
if "NEGO_DATA" not in os.environ and SHARED_DATA.exists():
    os.environ["NEGO_DATA"] = str(SHARED_DATA)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM engine: ~2 s start on CPU
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from model import randomise_lora_b  # noqa: E402,F401  (one implementation; the tests import it from here)


@contextmanager
def one_thread():
    """The test machine is shared: one intra-op thread is several times faster than two under load."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


@contextmanager
def vllm_server(model_dir: str, name: str, log_path, max_model_len: int = 2048, timeout: float = 300):
    """A real vLLM OpenAI-compatible server with `model_dir` on 127.0.0.1 (a free port); yields its /v1 URL and
    stops it afterwards. Started by module: the `vllm` command looks up the "vllm" distribution, which vllm-cpu
    is not."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name",
         name, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
         "--dtype", "float32", "--enforce-eager"], stdout=log, stderr=subprocess.STDOUT,
        env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"vLLM server did not come up:\n{Path(log_path).read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
