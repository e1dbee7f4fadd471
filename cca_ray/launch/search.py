"""Ray Tune over DCM lambda and update lr for one model (or over one compared method's lr).

Per model a placement group holds its SamplerActor and EvalActor; the shared stages (data, base
evaluation, traces, localisation) run once in the model's job through the sampler; each Tune trial
starts a TrainerActor in its own placement-group bundle, runs DCM(lambda) -> update(lr) and reports
every validation, so ASHA can stop bad trials early. The best trial's config then gets the test
split and the lm-eval suites; results land in DIR/models/<key>/result.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray

from cca_ray.config import BUILTIN, CCAConfig, parse_config
from cca_ray.io import write_json
from cca_ray.logs import log_to
from cca_ray.methods import CCA, method
from cca_ray.ray_base import (
    actor_options,
    bundle,
    distribution,
    logger_callbacks,
    result_rows,
    search_algorithm,
)

log = logging.getLogger("cca_ray")

EXPERIMENT = "search"  # the Tune experiment's folder under DIR/models/<key>/tune/


def round_sig(x: float, digits: int) -> float:
    """x to this many significant digits (lambda is rounded so trials can share cached masks)."""
    return float(f"{x:.{digits}g}")


def trial_config(config: dict, params: dict) -> CCAConfig:
    """The model's config with this trial's lambda and lr (one lr, no random control)."""
    c = parse_config(config)
    lam = round_sig(params.get("lambda", c.dcm.lambda_), c.tune.lambda_digits)
    return c.model_copy(update={
        "dcm": c.dcm.model_copy(update={"lambda_": lam}),
        "update": c.update.model_copy(update={"lr": params["lr"], "lr_grid": [], "random_seeds": 0})})


def _attempts(out: Path, trial_id: str) -> int:
    """Count this trial's starts (a retried trial starts again) in DIR/models/<key>/trials/."""
    f = out / "trials" / f"{trial_id}.attempts"
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as fh:  # an append-only counter: one line per start, never rewritten
        fh.write(f"{time.time()}\n")
    return len(f.read_text().splitlines())


def trial(params: dict, *, config: dict, out: str, sampler: Any, name: str = CCA) -> None:
    """One Tune trial: a TrainerActor in this trial's placement group runs DCM(lambda) and the
    method ``name`` at lr; each validation is reported (objective = best val so far), then the final."""
    from ray import tune

    from actors.trainer import TrainerActor

    c = trial_config(config, params)
    ctx = tune.get_context()
    attempt = _attempts(Path(out), ctx.get_trial_id())
    opts = actor_options(c.resources.trainer, ray.util.get_current_placement_group(), 1,
                         name=f"trainer-{ctx.get_trial_id()}-{attempt}")
    trainer = TrainerActor.options(**opts).remote(c.model_dump(by_alias=True), out, sampler)
    try:
        base = {"method": name, "lambda": c.dcm.lambda_, "lr": params["lr"], "attempt": attempt,
                "components_fraction": 1.0}
        if method(name).needs_mask:
            base["components_fraction"] = ray.get(trainer.dcm.remote())["components_fraction"]
        best = None
        for ref in trainer.update.remote(name, params["lr"]):
            event = ray.get(ref)
            if event["kind"] == "validation":
                best = event["val_accuracy"] if best is None else max(best, event["val_accuracy"])
                tune.report(base | {"step": event["step"], "val_accuracy": event["val_accuracy"],
                                    "best_val": best, "objective": best})
                continue
            objective, drop = event["best_val"], None
            if c.tune.objective == "val_minus_general_drop":
                deltas = ray.get(trainer.general_deltas.remote(event, name))
                drops = [max(0.0, -d["delta"]) for d in deltas.values()]
                drop = sum(drops) / len(drops) if drops else 0.0
                objective -= c.tune.general_penalty * drop
            tune.report(base | {"step": event["best_step"], "val_accuracy": event["best_val"],
                                "best_val": event["best_val"], "objective": objective, "general_drop": drop,
                                "done_update": 1})
    finally:
        ray.kill(trainer)


def model_trainable(key: str, config: dict, out: str, sampler: Any, name: str | None = None):
    """The trial function bound to one model (and compared method). Named per model and method: Tune
    registers trainables and with_parameters' objects job-wide by name, so concurrent searches must
    not share one."""

    def run(params: dict) -> None:
        trial(params, config=config, out=out, sampler=sampler, name=name or CCA)

    run.__name__ = run.__qualname__ = f"cca_trial_{key}" + (f"_{name}" if name else "")
    return run


def search_space(c: CCAConfig, name: str | None = None) -> dict:
    """lambda and lr for the sweep's CCA search; lr alone (the method's range) for a compared method
    (methods on the mask keep the config's dcm.lambda, so random draws as many components)."""
    if name is None:
        return {"lambda": distribution(c.tune.lambda_), "lr": distribution(c.tune.lr)}
    return {"lr": distribution(method(name).lr_range(c))}


def make_tuner(key: str, c: CCAConfig, out: Path, sampler: Any, resume: bool, name: str | None = None):
    """The model's Tuner (restored from its experiment folder when resuming): the sweep's lambda x lr
    search, or, with ``name``, that compared method's lr search (compare.num_samples trials)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    res = c.resources
    trainable = tune.with_resources(
        model_trainable(key, c.model_dump(by_alias=True), str(out), sampler, name),
        tune.PlacementGroupFactory([bundle(res.trial), bundle(res.trainer)]))
    path = (out / "tune").resolve()
    experiment = EXPERIMENT if name is None else f"compare-{name}"
    if resume and tune.Tuner.can_restore(str(path / experiment)):
        log.info("resuming the Tune experiment in %s", path / experiment)
        return tune.Tuner.restore(str(path / experiment), trainable, resume_errored=True)
    settings = c.tune
    reports = len(method(name or CCA).schedule(c)) + 1  # its validations + the final: ASHA's max_t
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=reports,
                               grace_period=settings.grace_period, reduction_factor=settings.reduction_factor)
                 if settings.scheduler == "asha" else FIFOScheduler())
    samples = settings.num_samples if name is None else c.compare.num_samples
    concurrent = (settings.max_concurrent_trials if name is None or c.compare.max_concurrent_trials is None
                  else c.compare.max_concurrent_trials)
    return tune.Tuner(
        trainable, param_space=search_space(c, name),
        tune_config=tune.TuneConfig(metric="objective", mode="max", scheduler=scheduler,
                                    search_alg=search_algorithm(settings.search, settings.seed),
                                    num_samples=samples, max_concurrent_trials=concurrent,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=experiment, storage_path=str(path), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                  callbacks=logger_callbacks(settings.loggers, out, f"{key}-{experiment}")))


def trial_rows(results) -> list[dict]:
    """One row per trial of a CCA or compared-method search, for result.json and the reports."""
    def row(m: dict, cfg: dict) -> dict:
        return {"method": m.get("method"), "lambda": m.get("lambda", cfg.get("lambda")),
                "lr": m.get("lr", cfg.get("lr")), "val_accuracy": m.get("best_val"),
                "objective": m.get("objective"), "components_fraction": m.get("components_fraction"),
                "iterations": m.get("training_iteration"), "attempts": m.get("attempt"),
                "status": "TERMINATED" if m.get("done_update") else "STOPPED"}

    rows = result_rows(results, row)
    for r in rows:
        if r["error"]:
            r["status"] = "ERROR"
    return rows


def model_group(c: CCAConfig, path: str) -> tuple[Any, Any]:
    """The model's placement group (bundle 0: its SamplerActor, bundle 1: its evaluator) and the
    started SamplerActor."""
    from ray.util.placement_group import placement_group

    from actors.sampler import SamplerActor

    res = c.resources
    pg = placement_group([bundle(res.sampler), bundle(res.eval)], strategy="PACK")
    ray.get(pg.ready())
    sampler = SamplerActor.options(**actor_options(res.sampler, pg, 0)).remote(
        c.sampling.backend, path, c.model.dtype, c.evaluation.batch_size,
        max(c.sampling.max_new_tokens, c.evaluation.max_new_tokens), sync_timeout=c.sampling.sync_timeout_s)
    return pg, sampler


def display_name(key: str, c: CCAConfig) -> str:
    """The report's name of a model: its key, and what it is when the key does not say it."""
    name = c.model.name
    if name == BUILTIN:
        steps = c.model.builtin_steps
        name = f"built-in tiny model ({f'{steps} training steps' if steps else 'default build'})"
    return key if key == name else f"{key}: {name}"


def tune_model(key: str, config: dict, out: str, resume: bool = False, progress: bool = False) -> dict:
    """One model of a sweep (a Ray task): shared stages once, the Tune search, the best config's
    test and general evaluation; writes and returns DIR/models/<key>/result.json's content."""
    from ray.util.placement_group import remove_placement_group

    from actors.evaluator import EvalActor
    from actors.sampler import SamplerClient
    from cca_ray.pipeline.model import model_path
    from cca_ray.pipeline.run import Pipeline

    start = time.time()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    log_to(root / "run.log")
    c = parse_config(config)
    path, _ = model_path(c, progress)
    pg, sampler = model_group(c, path)
    try:
        pipe = Pipeline(c, root, progress, sampler=SamplerClient(sampler))
        prep = pipe.prepare()
        log.info("%s: shared stages ready (%d train pivots, %d held out); stages computed %s, reused %s",
                 key, len(prep.pivots), len(prep.heldout), pipe.store.computed, pipe.store.reused)
        results = make_tuner(key, c, root, sampler, resume).fit()
        trials = trial_rows(results)
        best = results.get_best_result(metric="objective", mode="max", scope="all")
        chosen = trial_config(c.model_dump(by_alias=True), {"lambda": best.config["lambda"],
                                                            "lr": best.config["lr"]})
        chosen = chosen.model_copy(update={"update": chosen.update.model_copy(
            update={"random_seeds": c.update.random_seeds})})
        evaluator = EvalActor.options(**actor_options(c.resources.eval, pg, 1)).remote(
            chosen.model_dump(by_alias=True), str(root), sampler)
        report = ray.get(evaluator.final.remote())
        ray.kill(evaluator)
    finally:
        ray.kill(sampler)
        remove_placement_group(pg)
    result = {"model": display_name(key, c), "model_key": key, "model_path": path, "status": "finished",
              "base": report["base"], "cca": report["cca"], "general": report["general"],
              "random_control": report["random_control"], "pivots": report["pivots"],
              "wall_seconds": round(time.time() - start, 1), "trials": trials,
              "shared_stages": {"computed": pipe.store.computed, "reused": pipe.store.reused}}
    write_json(result, root / "result.json")
    return result
