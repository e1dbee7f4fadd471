"""General-capability regression: lm-eval tasks on an in-memory model, before vs after."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

_METRICS = ("acc", "exact_match", "mc2", "mc1", "acc_norm", "bleu_acc")


def general_scores(model, tokenizer, tasks: list[str], num_fewshot: Mapping[str, int] | None = None,
                   include_path: str | Path | None = None, limit: int | None = None,
                   batch_size: int = 32, max_length: int = 2048, results_dir: str | Path | None = None,
                   model_name: str = "model") -> dict[str, dict]:
    """task -> {score, stderr, metric} through lm-eval's HFLM on the model held in memory.

    Tasks with different few-shot counts run in separate lm-eval calls (its num_fewshot is global).
    ``include_path`` adds a folder of local task YAMLs (the built-in world's tasks/). ``results_dir``:
    also write lm-eval's own results files there (results_<date>.json under a folder named after
    ``model_name``, one per call), what lm-eval's command line writes with --output_path.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        return {}
    num_fewshot = dict(num_fewshot or {})
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; check evaluation.general_tasks "
                         f"(local task folder: {include_path or 'none'})")
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        groups.setdefault(num_fewshot.get(task), []).append(task)
    out: dict[str, dict] = {}
    for shots, names in groups.items():
        tracker = EvaluationTracker(output_path=str(results_dir)) if results_dir else None
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                          num_fewshot=shots, limit=limit, log_samples=False,
                                          verbosity="ERROR", evaluation_tracker=tracker,
                                          model_args=f"pretrained={model_name}")
        if tracker is not None:
            tracker.save_results_aggregated(results=copy.deepcopy(results), samples=None)
        for name, metrics in results["results"].items():
            if name not in names:
                continue  # group sub-entries are reported through their group
            key = next((k for m in _METRICS for k in metrics if k.split(",")[0] == m), None)
            if key is None:
                raise ValueError(f"lm-eval task {name}: none of the metrics {_METRICS} in {list(metrics)}")
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            out[name] = {"score": float(metrics[key]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "metric": key.split(",")[0]}
    return out


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager for ``tasks``: over the local folder alone when it holds every one of them
    (indexing lm-eval's ~15,000 built-in tasks costs ~8 s per call on 2 cores, paid by every evaluation
    of the built-in world), else over the built-in tasks and the folder."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def general_deltas(before: Mapping[str, dict], after: Mapping[str, dict]) -> dict[str, dict]:
    """task -> {before, after, delta, stderr, metric}; stderr combines both runs' errors."""
    out = {}
    for task, b in before.items():
        a = after[task]
        errs = [e for e in (b.get("stderr"), a.get("stderr")) if e is not None]
        out[task] = {"before": b["score"], "after": a["score"], "delta": a["score"] - b["score"],
                     "stderr": (sum(e * e for e in errs) ** 0.5) if errs else None,
                     "metric": b.get("metric")}
    return out
