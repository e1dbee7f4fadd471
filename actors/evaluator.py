"""EvalActor: the chosen (lambda, lr) of a model on the test split and the lm-eval suites, the
random-component control if configured, the export and the model's report; CompareEvalActor: the
base model and each compared method at its chosen lr. Both are thin shells over pipeline/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from cca_ray.config import parse_config
from cca_ray.logs import log_to
from cca_ray.pipeline import evaluate
from cca_ray.pipeline.run import Pipeline


class Evaluator:
    """The evaluation role (plain class; EvalActor is its Ray actor)."""

    def __init__(self, config: dict, out: str, sampler: Any = None):
        from actors.sampler import SamplerClient

        log_to(Path(out) / "run.log")
        self.pipe = Pipeline(parse_config(config), out, progress=False,
                             sampler=SamplerClient(sampler) if sampler else None)
        self.prep = self.pipe.prepare()

    def final(self) -> dict:
        """report.json for this config (its update is reused from the trial that ran it)."""
        return self.pipe.report(self.prep)


EvalActor = ray.remote(Evaluator)


class CompareEvaluator(Evaluator):
    """`cca-ray compare`'s evaluation role: the base model, then each method at its chosen lr."""

    def base(self) -> dict:
        return evaluate.base_summary(self.pipe, self.prep)

    def method(self, name: str, lr: float) -> dict:
        return evaluate.method_result(self.pipe, name, lr, self.prep)


CompareEvalActor = ray.remote(CompareEvaluator)
