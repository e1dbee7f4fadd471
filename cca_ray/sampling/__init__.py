"""Trace generation behind one small interface (Sampler), with an HF and a vLLM backend that cut
completions identically. vLLM is imported only when the vllm backend is asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cca_ray.sampling.base import Completion, Sampler, cut_at_stop
from cca_ray.sampling.hf import HFSampler

__all__ = ["BACKENDS", "Completion", "HFSampler", "Sampler", "cut_at_stop", "make_sampler"]

BACKENDS = ("hf", "vllm")


def make_sampler(backend: str, model_dir: str | Path | None = None, *, model: Any = None,
                 tokenizer: Any = None, dtype: str = "float32", batch_size: int = 16,
                 max_new_tokens: int = 256, progress: bool = True, max_model_len: int = 2048,
                 cpu_threads: int | None = None, sync_timeout: float = 300.0) -> Sampler:
    """A sampler of the named backend.

    "hf" uses the given in-memory model/tokenizer, or loads model_dir (onto the GPU when there is
    one); "vllm" starts a vllm.LLM on model_dir (batch_size is vLLM's own business there)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sampling backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "vllm":
        if model_dir is None:
            raise ValueError("the vllm backend needs model_dir (it loads the model itself)")
        from cca_ray.sampling.vllm_backend import VLLMSampler

        return VLLMSampler(model_dir, dtype=dtype, max_new_tokens=max_new_tokens, progress=progress,
                           max_model_len=max_model_len, tokenizer=tokenizer, cpu_threads=cpu_threads,
                           sync_timeout=sync_timeout)
    if model is None or tokenizer is None:
        if model_dir is None:
            raise ValueError("the hf backend needs model and tokenizer, or model_dir")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            if torch.cuda.is_available():
                model = model.to("cuda")
    return HFSampler(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     progress=progress)
