"""Ray Tune in CARBS's part: per (model, task), search the pruning hyperparameters for the smallest
circuit that reaches the target loss. The first trial is the paper's search centres (the config's
`prune` values); Optuna (or random search) proposes the rest. Each trial writes its whole pruning
result to TRIALS/<trial_id>.json (TRIALS: the pruning stage's trials/ folder), so the best one is
kept without rerunning it.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

from cca_ray.circuits.artifacts import Artifacts, objective
from cca_ray.circuits.config import CircuitsConfig
from cca_ray.io import write_json
from cca_ray.logs import log_to
from cca_ray.ray_base import distribution, init_ray, logger_callbacks, result_rows, search_algorithm

log = logging.getLogger(__name__)


def search_space(c: CircuitsConfig) -> dict:
    """The Tune distributions of the searched pruning hyperparameters."""
    return {k: distribution(r) for k, r in c.search.space.items()}


def search_seed(seed: int, variant: str, task: str) -> int:
    """The search algorithm's seed for one (model, task): the config's seed mixed with their names.
    With one seed for all, every search proposed the same second point (its level, lr and seed), so a
    (model, task) where that point failed had, in effect, one trial."""
    return (seed * 1_000_003 + zlib.crc32(f"{variant}/{task}".encode())) % 2**31


def _trial(params: dict, *, config: dict, out: str, variant: str, task: str, trials: str) -> None:
    """One Tune trial: prune with these hyperparameters, store the result, report the objective."""
    from ray import tune

    log_to(Path(out) / "run.log")
    c = CircuitsConfig.model_validate(config)
    result = Artifacts(c, out).prune_one(variant, task, params)
    trial_id = tune.get_context().get_trial_id()
    write_json({"trial_id": trial_id, "params": params, **result}, Path(trials) / f"{trial_id}.json")
    tune.report({"objective": objective(result), "n_nodes": result.get("n_nodes"),
                 "reached": bool(result.get("reached")), "task_loss": result.get("task_loss"),
                 "trial_id": trial_id})


def named_trial(variant: str, task: str):
    """_trial under a name of its own per (model, task): Tune registers trainables, and
    with_parameters its objects, job-wide by name, so concurrent searches sharing one name would run
    each other's trials (every trial of 8 concurrent searches pruned the same task, seen once)."""

    def run(params: dict, **kwargs) -> None:
        _trial(params, **kwargs)

    run.__name__ = run.__qualname__ = f"circuits_trial_{variant}_{task}"
    return run


def _row(m: dict, config: dict) -> dict:
    return {"params": config, "objective": m.get("objective"), "n_nodes": m.get("n_nodes"),
            "reached": m.get("reached"), "task_loss": m.get("task_loss")}


def search_circuit(a: Artifacts, variant: str, task: str, trials: Path,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Run the search for one (variant, task), each trial's result written into ``trials``; return
    the best trial's result and every trial's row."""
    from ray import tune

    init_ray()
    a.load(variant)  # the means, once, before the trials need them
    c, out = a.c, a.out.resolve()
    s = c.search
    centres = {k: getattr(c.prune, k) for k in s.space}
    trainable = tune.with_resources(
        tune.with_parameters(named_trial(variant, task), config=c.model_dump(mode="json"), out=str(out),
                             variant=variant, task=task, trials=str(Path(trials).resolve())),
        {"cpu": s.trial.num_cpus, "gpu": s.trial.num_gpus})
    # one experiment per pruning stage: a changed config never mixes with an earlier search's trials
    name = f"circuits-{variant}-{task}-{a.prune_key(variant, task, searched=True)}"
    tuner = tune.Tuner(
        trainable, param_space=search_space(c),
        tune_config=tune.TuneConfig(metric="objective", mode="min",
                                    search_alg=search_algorithm(s.search, search_seed(s.seed, variant, task),
                                                                [centres]),
                                    num_samples=s.num_samples, max_concurrent_trials=s.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str(out / "tune"), verbose=1 if progress else 0,
                                  callbacks=logger_callbacks(s.loggers, out, name)))
    log.info("%s: Tune search over %s, %d trials", name, ", ".join(s.space), s.num_samples)
    rows = result_rows(tuner.fit(), _row)
    done = [t for t in rows if t["objective"] is not None]
    if not done:
        raise RuntimeError(f"{name}: no Tune trial finished; see the errors in {out / 'tune' / name}")
    best = min(done, key=lambda t: (t["objective"], t["task_loss"] if t["task_loss"] is not None else 1e9))
    result = json.loads((Path(trials) / f"{best['trial_id']}.json").read_text())
    result["search"] = {"best_trial": best["trial_id"], "best_params": best["params"], "trials": len(rows)}
    return result, rows
