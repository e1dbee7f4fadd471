"""EvalActor: the chosen (lambda, lr) of a model on the test split and the lm-eval suites, the
random-component control if configured, the export and the model's report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from cca_ray.config import parse_config
from cca_ray.pipeline import Pipeline, random_selection
from cca_ray.reports.run import write_report


class Evaluator:
    """The evaluation role (plain class; EvalActor is its Ray actor)."""

    def __init__(self, config: dict, out: str, sampler: Any = None):
        from actors.sampler import SamplerClient
        from cca_ray.logs import log_to

        log_to(Path(out) / "run.log")

        self.pipe = Pipeline(parse_config(config), out, progress=False,
                             sampler=SamplerClient(sampler) if sampler else None)
        self.prep = self.pipe.prepare()

    def final(self) -> dict:
        """report.json for this config: its update is reused from the trial that ran it."""
        p = self.pipe
        masks, dcm_meta = p.dcm(self.prep.pivots)
        selected = {k: m > 0.5 for k, m in masks.items()}
        _, runs = p.best_update("cca", selected, self.prep)
        random_runs = [p.best_update(f"random{s}", random_selection(selected, s), self.prep)[1]
                       for s in range(p.config.update.random_seeds)]
        report = p.final_report(self.prep, dcm_meta, runs, random_runs)
        write_report(report, p.out)
        return report


EvalActor = ray.remote(Evaluator)


def _entries_changed(run: dict) -> int:
    """Entries of the base model this run's best step changes (rows: nonzero deltas)."""
    from safetensors.torch import load_file

    path = Path(run["path"])
    if (path / "best_weights.safetensors").is_file():
        return int(run["changed_parameters"])
    deltas = load_file(str(path / "best_deltas.safetensors"))
    return sum(int((d != 0).sum()) for d in deltas.values())


class CompareEvaluator(Evaluator):
    """`cca-ray compare`'s evaluation role: the base model, then each method at its chosen lr."""

    def base(self) -> dict:
        """Base test accuracy (per template), val accuracy, general scores and the parameter count."""
        from cca_ray.data.answers import macro_accuracy
        from cca_ray.evaluate import accuracy_report

        p, prep = self.pipe, self.prep
        val = [(q.id, prep.correct["val"][q.key]) for q in prep.splits.val]
        return {"test": accuracy_report(prep.splits.test, prep.correct["test"]),
                "val_accuracy": macro_accuracy(val), "general": p.general("base", None),
                "parameters": sum(t.numel() for t in p.m.model.parameters()),
                "test_problems": len(prep.splits.test), "val_problems": len(prep.splits.val)}

    def method(self, method: str, lr: float) -> dict:
        """One method at its chosen lr: the run (reused from its trial), test accuracy per template
        (random: every seed of update.random_seeds, averaged per template; seed 0 is the tuned one),
        general-suite deltas (random: seed 0), and what it trains and changes."""
        import time

        from cca_ray.evaluate import accuracy_report, general_deltas

        start = time.perf_counter()
        p, prep = self.pipe, self.prep
        selected, components = None, 1.0  # the baselines can change every head and neuron
        if method in ("cca", "random"):
            masks, dcm_meta = p.dcm(prep.pivots)
            selected = {k: m > 0.5 for k, m in masks.items()}
            components = dcm_meta["components_fraction"]
        seeds = list(range(max(1, p.config.update.random_seeds))) if method == "random" else [0]
        names = [f"random{s}" if method == "random" else method for s in seeds]
        runs = [p.method_run(method, lr, prep, selected, seed=s) for s in seeds]
        tests = [accuracy_report(prep.splits.test, p.test_eval(n, r, prep.splits.test))
                 for n, r in zip(names, runs, strict=True)]
        templates = tests[0]["per_template"]
        per_template = {t: sum(x["per_template"][t] for x in tests) / len(tests) for t in templates}
        general = general_deltas(p.general("base", None), p.general(names[0], runs[0]))
        return {"method": method, "lr": lr, "best_step": runs[0]["best_step"],
                "val_accuracy": runs[0]["best_val"],
                "test_accuracy": sum(x["accuracy"] for x in tests) / len(tests),
                "seed_test_accuracies": [x["accuracy"] for x in tests] if method == "random" else None,
                "per_template_test": per_template, "general_deltas": general,
                "components_fraction": components,
                "trainable_parameters": runs[0]["trainable_parameters"],
                "entries_changed": _entries_changed(runs[0]),
                "eval_seconds": round(time.perf_counter() - start, 1)}


CompareEvalActor = ray.remote(CompareEvaluator)
