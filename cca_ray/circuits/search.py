"""Ray Tune in CARBS's part: per (model, task), search the pruning hyperparameters for the smallest
circuit that reaches the target loss. The first trial is the paper's search centres (the config's
`prune` values); Optuna (or random search) proposes the rest. Each trial writes its whole pruning
result to circuits/<variant>/<task>/trials/<trial_id>.json, so the best one is kept without
rerunning it and a crashed search loses only its running trials.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cca_ray.circuits.config import CircuitsConfig
from cca_ray.io import write_json

log = logging.getLogger(__name__)


def search_space(c: CircuitsConfig) -> dict:
    from ray import tune

    return {k: (tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high))
            for k, r in c.search.space.items()}


def _trial(params: dict, *, config: dict, out: str, variant: str, task: str) -> None:
    """One Tune trial: prune with these hyperparameters, store the result, report the objective."""
    import torch
    from ray import tune

    from cca_ray.circuits.run import circuit_dir, objective, prune_one

    c = CircuitsConfig.model_validate(config)
    if c.search.trial.threads:
        torch.set_num_threads(c.search.trial.threads)
    result = prune_one(c, Path(out), variant, task, params)
    trial_id = tune.get_context().get_trial_id()
    write_json({"trial_id": trial_id, "params": params, **result},
               circuit_dir(Path(out), variant, task) / "trials" / f"{trial_id}.json")
    tune.report({"objective": objective(result), "n_nodes": result.get("n_nodes"),
                 "reached": bool(result.get("reached")), "task_loss": result.get("task_loss"),
                 "trial_id": trial_id})


def search_circuit(c: CircuitsConfig, out: Path, variant: str, task: str,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Run the search for one (variant, task); return the best trial's result and every trial's row."""
    from ray import tune

    from cca_ray.circuits.run import circuit_dir, load_variant
    from cca_ray.tune import init_ray

    init_ray()
    load_variant(c, out, variant)  # the means, once, before trials race to compute them
    s = c.search
    centres = {k: getattr(c.prune, k) for k in s.space}
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch(points_to_evaluate=[centres], seed=s.seed)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        alg = BasicVariantGenerator(points_to_evaluate=[centres], random_state=s.seed)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, config=c.model_dump(mode="json"), out=str(out.resolve()),
                             variant=variant, task=task),
        {"cpu": s.trial.num_cpus, "gpu": s.trial.num_gpus})
    name = f"circuits-{variant}-{task}"
    tuner = tune.Tuner(
        trainable, param_space=search_space(c),
        tune_config=tune.TuneConfig(metric="objective", mode="min", search_alg=alg, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str((out / "tune").resolve()),
                                  verbose=1 if progress else 0))
    log.info("%s: Tune search over %s, %d trials", name, ", ".join(s.space), s.num_samples)
    results = tuner.fit()
    trials = []
    for res in results:
        m = res.metrics or {}
        trials.append({"trial_id": m.get("trial_id"), "params": res.config, "objective": m.get("objective"),
                       "n_nodes": m.get("n_nodes"), "reached": m.get("reached"),
                       "task_loss": m.get("task_loss"),
                       "error": str(res.error)[:300] if res.error else None})
    done = [t for t in trials if t["objective"] is not None]
    if not done:
        raise RuntimeError(f"{name}: no Tune trial finished; see the errors in {out / 'tune' / name}")
    best = min(done, key=lambda t: (t["objective"], t["task_loss"] if t["task_loss"] is not None else 1e9))
    path = circuit_dir(out, variant, task) / "trials" / f"{best['trial_id']}.json"
    result = json.loads(path.read_text())
    result["search"] = {"best_trial": best["trial_id"], "best_params": best["params"], "trials": len(trials)}
    return result, trials
