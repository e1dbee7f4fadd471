"""EvalActor: the chosen (lambda, lr) of a model on the test split and the lm-eval suites, the
random-component control if configured, the export and the model's report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from cca_ray.config import parse_config
from cca_ray.pipeline import Pipeline, random_selection
from cca_ray.report import write_report


class Evaluator:
    """The evaluation role (plain class; EvalActor is its Ray actor)."""

    def __init__(self, config: dict, out: str, sampler: Any = None):
        from actors.sampler import SamplerClient
        from cca_ray.io import log_to

        log_to(Path(out) / "run.log")

        self.pipe = Pipeline(parse_config(config), out, progress=False,
                             sampler=SamplerClient(sampler) if sampler else None)
        self.prep = self.pipe.prepare()

    def final(self) -> dict:
        """report.json for this config: its update is reused from the trial that ran it."""
        p = self.pipe
        masks, dcm_meta = p.dcm(self.prep.pivots)
        selected = {k: m > 0.5 for k, m in masks.items()}
        best, runs = p.best_update("cca", selected, self.prep)
        random_best = [p.best_update(f"random{s}", random_selection(selected, s), self.prep)[0]
                       for s in range(p.config.update.random_seeds)]
        report = p.final_report(self.prep, dcm_meta, best, runs, random_best)
        write_report(report, p.out)
        return report


EvalActor = ray.remote(Evaluator)
