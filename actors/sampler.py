"""SamplerActor: one generation engine per model (vLLM when configured, the HF backend otherwise),
shared by the model's stages and all its Tune trials. SamplerClient gives a caller the ordinary
Sampler interface over the actor, with its own view of the weights.

Each client keeps the weight update it pushed (HF parameter name -> whole weight, changed rows or a
LoRA product; sampling/weights.py) and sends it, by object reference, with every call; the actor
loads a client's update only when it differs from what the engine holds, and puts every other
touched weight back to the checkpoint's. Calls run one at a time in the actor, so concurrent trials
each generate with exactly their own weights."""

from __future__ import annotations

import uuid
from typing import Any

import ray
import torch

from cca_ray.io import checkpoint_reader
from cca_ray.sampling import make_sampler
from cca_ray.sampling.base import Completion
from cca_ray.sampling.weights import WeightUpdate, combine, detached, materialise


class SamplerEngine:
    """The engine and its weight bookkeeping (plain class; SamplerActor is its Ray actor)."""

    def __init__(self, backend: str, model_dir: str, dtype: str = "float32", batch_size: int = 64,
                 max_new_tokens: int = 256, max_model_len: int = 4096, sync_timeout: float = 300.0):
        self.backend, self.model_dir = backend, model_dir
        self.sampler = make_sampler(backend, model_dir, dtype=dtype, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, progress=False,
                                    max_model_len=max_model_len, sync_timeout=sync_timeout)
        self._base = checkpoint_reader(model_dir)
        self.loaded_key: tuple | None = None
        self.loaded: set[str] = set()  # HF names whose engine weight differs from the checkpoint's
        self.loads = 0  # how many times weights were loaded (the tests read it)

    def _apply(self, update: WeightUpdate) -> None:
        if not update:
            return
        self.loads += 1
        if self.backend == "vllm":
            self.sampler.push_weights(update)
            return
        params = dict(self.sampler.model.named_parameters())
        with torch.no_grad():
            for name, entry in update.items():  # the checkpoint is read only where the entry needs it
                w = entry if isinstance(entry, torch.Tensor) else materialise(entry, self._base(name))
                params[name].copy_(w.to(params[name].device, params[name].dtype))

    def ensure(self, key: tuple | None, box: list) -> None:
        """Make the engine hold the checkpoint plus this client's update (box[0]: its ref). A weight
        another client changed is first put back where this client changes only part of it (rows,
        a LoRA product): its other rows must be the checkpoint's."""
        if key == self.loaded_key:
            return
        target: WeightUpdate = ray.get(box[0]) if box and box[0] is not None else {}
        partial = {n: None for n in self.loaded & target.keys() if not isinstance(target[n], torch.Tensor)}
        self._apply(partial)
        self._apply({**{n: None for n in self.loaded - target.keys()}, **target})
        self.loaded, self.loaded_key = set(target), key

    def generate(self, key: tuple | None, box: list, prompts: list[str],
                 **kwargs: Any) -> list[list[Completion]]:
        self.ensure(key, box)
        return self.sampler.generate(prompts, **kwargs)

    def generate_ids(self, key: tuple | None, box: list, prompt_ids: list[list[int]],
                     **kwargs: Any) -> list[list[Completion]]:
        self.ensure(key, box)
        return self.sampler.generate_ids(prompt_ids, **kwargs)

    def get_tokenizer(self) -> Any:
        return self.sampler.tokenizer

    def stats(self) -> dict:
        return {"loads": self.loads, "loaded": sorted(self.loaded)}

    def close(self) -> None:
        if hasattr(self.sampler, "close"):
            self.sampler.close()


SamplerActor = ray.remote(SamplerEngine)


class SamplerClient:
    """The Sampler interface (generate, generate_ids, push_weights, close) over a SamplerActor."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.id = uuid.uuid4().hex
        self.version = 0
        self.weights: WeightUpdate = {}
        self._ref: Any = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The engine's tokenizer (fetched once): prompts are encoded exactly as it encodes them."""
        if self._tokenizer is None:
            self._tokenizer = ray.get(self.handle.get_tokenizer.remote())
        return self._tokenizer

    def push_weights(self, weights: WeightUpdate) -> None:
        """A weight update (sampling/weights.py), kept for every later call of this client; None
        entries put those weights back to the checkpoint's."""
        for name, entry in detached(weights).items():
            if entry is None:
                self.weights.pop(name, None)
            else:
                self.weights[name] = combine(self.weights.get(name), entry)
        self.version += 1
        self._ref = None

    def _state(self) -> tuple[tuple | None, list]:
        if not self.weights:
            return None, [None]
        if self._ref is None:
            self._ref = ray.put(self.weights)
        return (self.id, self.version), [self._ref]

    def generate(self, prompts: list[str], **kwargs: Any) -> list[list[Completion]]:
        key, box = self._state()
        return ray.get(self.handle.generate.remote(key, box, prompts, **kwargs))

    def generate_ids(self, prompt_ids: list[list[int]], **kwargs: Any) -> list[list[Completion]]:
        key, box = self._state()
        return ray.get(self.handle.generate_ids.remote(key, box, prompt_ids, **kwargs))

    def close(self) -> None:
        """Nothing to free here: the actor belongs to the model's job, which shuts it down."""
