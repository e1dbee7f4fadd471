"""The inference engines of a run and the weights they see: greedy evaluation and sampling on the
configured backend (HF in memory, vLLM, or a shared Ray sampler), kept in step with every weight
change the updates and evaluations make to the in-memory model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from cca_ray.config import CCAConfig
from cca_ray.data.gsm_symbolic import Problem
from cca_ray.evaluate import greedy_correct
from cca_ray.pipeline.model import Loaded
from cca_ray.sampling import make_sampler
from cca_ray.sampling.weights import Rows, WeightUpdate
from cca_ray.update import merge_rows


class Engines:
    """The samplers of one run. ``shared``: a sampler shared with others (e.g. a client of a Ray
    sampler actor) that takes HF-named weights in push_weights; None = start the configured backend
    here."""

    def __init__(self, config: CCAConfig, model: Callable[[], Loaded], progress: bool = True,
                 shared=None):
        self.config, self.progress, self.shared = config, progress, shared
        self._model = model
        self._eval = None
        self._gen = None

    @property
    def m(self) -> Loaded:
        return self._model()

    def eval_sampler(self):
        """Greedy evaluation runs on the configured backend too. HF sees the in-memory model as it
        is (hooks, merged rows); a vLLM engine is kept in step by pushing changed weights to it."""
        if self.config.sampling.backend != "hf" or self.shared is not None:
            return self.gen_sampler()
        if self._eval is None:
            settings = self.config.evaluation
            self._eval = make_sampler("hf", model=self.m.model, tokenizer=self.m.tokenizer,
                                      batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                                      progress=self.progress)
        return self._eval

    def gen_sampler(self):
        """The configured backend for traces, branching completions and evaluation."""
        sampling = self.config.sampling
        if self.shared is not None:
            return self.shared
        if sampling.backend == "hf":
            return make_sampler("hf", model=self.m.model, tokenizer=self.m.tokenizer,
                                batch_size=sampling.batch_size, max_new_tokens=sampling.max_new_tokens,
                                progress=self.progress)
        if self._gen is None:
            self._gen = make_sampler(sampling.backend, self.m.path, dtype=self.config.model.dtype,
                                     tokenizer=self.m.tokenizer, batch_size=sampling.batch_size,
                                     max_new_tokens=max(sampling.max_new_tokens,
                                                        self.config.evaluation.max_new_tokens),
                                     progress=self.progress, max_model_len=4096,
                                     cpu_threads=sampling.cpu_threads,
                                     sync_timeout=sampling.sync_timeout_s)
        return self._gen

    def push(self, weights: WeightUpdate) -> None:
        """Make a separate inference engine (vLLM, a shared sampler) see these weights (parameter
        name -> whole weight, changed Rows, a LowRank product or None: the checkpoint's); HF's own
        sampler shares the in-memory model already."""
        if weights and (self.shared is not None or self.config.sampling.backend != "hf"):
            self.gen_sampler().push_weights(weights)

    def greedy(self, problems: list[Problem], desc: str) -> dict[tuple, bool]:
        """Greedy correctness of the model as it stands on ``problems`` (problem key -> correct)."""
        return greedy_correct(self.eval_sampler(), problems, self.m.prompt(self.config), desc,
                              self.config.evaluation.max_new_tokens)

    def close(self) -> None:
        """Shut a vLLM engine down (its worker processes would otherwise outlive a failed run)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    @contextlib.contextmanager
    def applied(self, run: dict, deltas: str = "best") -> Iterator[None]:
        """The base model with this run's best weights in (and pushed to the engine), restored after:
        rows for row updates (``deltas``: "best" or "best_updated"), whole parameters for the
        whole-parameter baselines."""
        path = Path(run["path"]) / "best_weights.safetensors"
        if not path.is_file():
            with self.merged(run, deltas):
                yield
            return
        weights = load_file(str(path))
        params = dict(self.m.model.named_parameters())
        original = {n: params[n].detach().clone() for n in weights}
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.push({n: params[n] for n in weights})
        try:
            yield
        finally:
            with torch.no_grad():
                for n, w in original.items():
                    params[n].copy_(w)
            self.push(dict.fromkeys(weights))  # the engine back to the checkpoint's

    @contextlib.contextmanager
    def merged(self, run: dict, deltas: str = "best") -> Iterator[tuple[dict, list]]:
        """The base model with this run's best rows (``deltas``: "best" or "best_updated") written in
        (and pushed to the engine), restored afterwards; yields (rows, new row values)."""
        rows = dict(sorted(load_file(str(Path(run["path"]) / "rows.safetensors")).items()))
        saved = load_file(str(Path(run["path"]) / f"{deltas}_deltas.safetensors"))
        values = [saved[f"delta.{i}"] for i in range(len(saved))]
        params = dict(self.m.model.named_parameters())
        original = {n: params[n][r].detach().clone() for n, r in rows.items()}
        new = merge_rows(self.m.model, rows, values)
        self.push({n: Rows(r, params[n][r]) for n, r in rows.items()})  # the changed rows only
        try:
            yield rows, new
        finally:
            with torch.no_grad():
                for n, r in rows.items():
                    params[n][r] = original[n]
            self.push(dict.fromkeys(rows))  # the engine back to the checkpoint's
