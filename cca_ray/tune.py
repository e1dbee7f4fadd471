"""Ray Tune over DCM lambda and update lr for each model, and sweeps over many models.

The one orchestration module that launches the Ray actors (actors/): per model a placement group
holds its SamplerActor and EvalActor; the shared stages (data, base evaluation, traces,
localisation) run once in the model's job through the sampler; each Tune trial starts a
TrainerActor in its own placement group bundle, runs DCM(lambda) -> update(lr) and reports every
validation, so ASHA can stop bad trials early. The best trial's config then gets the test split and
the lm-eval suites; results land in DIR/models/<key>/result.json and the sweep report in DIR.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from cca_ray.config import CCAConfig, ConfigError, load_sweep, parse_config
from cca_ray.io import write_json
from cca_ray.logs import log_to

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


def _bundle(r) -> dict:
    return {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}


def actor_options(r, pg: Any = None, bundle: int = 0, **extra: Any) -> dict:
    """Ray options of an actor with resources ``r``, placed in bundle ``bundle`` of ``pg``. Ray gives a
    process with a fraction of a CPU one OpenMP thread; ``r.threads`` sets OMP_NUM_THREADS explicitly
    (torch in a trainer or an HF sampler; vLLM's CPU worker binds its own threads, one core per
    worker with one core reserved for its scheduler, whatever this says)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, **extra}
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=bundle)
    if r.threads:
        opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(r.threads)}}
    return opts


def _attempts(out: Path, trial_id: str) -> int:
    """Count this trial's starts (a retried trial starts again) in DIR/models/<key>/trials/."""
    f = out / "trials" / f"{trial_id}.attempts"
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "a") as fh:
        fh.write(f"{time.time()}\n")
    return len(f.read_text().splitlines())


def trial(params: dict, *, config: dict, out: str, sampler: Any, method: str = "cca") -> None:
    """One Tune trial: a TrainerActor in this trial's placement group runs DCM(lambda) and the
    update at lr (or a compared baseline method at lr); each validation is reported (objective = best
    val so far), then the final."""
    from ray import tune

    from actors.trainer import TrainerActor

    c = trial_config(config, params)
    ctx = tune.get_context()
    attempt = _attempts(Path(out), ctx.get_trial_id())
    opts = actor_options(c.resources.trainer, ray.util.get_current_placement_group(), 1,
                         name=f"trainer-{ctx.get_trial_id()}-{attempt}")
    trainer = TrainerActor.options(**opts).remote(c.model_dump(by_alias=True), out, sampler)
    try:
        base = {"method": method, "lambda": c.dcm.lambda_, "lr": params["lr"], "attempt": attempt,
                "components_fraction": 1.0}
        if method in ("cca", "random"):
            base["components_fraction"] = ray.get(trainer.dcm.remote())["components_fraction"]
        best = None
        for ref in trainer.update.remote(method, params["lr"]):
            event = ray.get(ref)
            if event["kind"] == "validation":
                best = event["val_accuracy"] if best is None else max(best, event["val_accuracy"])
                tune.report(base | {"step": event["step"], "val_accuracy": event["val_accuracy"],
                                    "best_val": best, "objective": best})
                continue
            objective, drop = event["best_val"], None
            if c.tune.objective == "val_minus_general_drop":
                deltas = ray.get(trainer.general_deltas.remote(event, method))
                drops = [max(0.0, -d["delta"]) for d in deltas.values()]
                drop = sum(drops) / len(drops) if drops else 0.0
                objective -= c.tune.general_penalty * drop
            tune.report(base | {"step": event["best_step"], "val_accuracy": event["best_val"],
                                "best_val": event["best_val"], "objective": objective, "general_drop": drop,
                                "done_update": 1})
    finally:
        ray.kill(trainer)


def model_trainable(key: str, config: dict, out: str, sampler: Any, method: str | None = None):
    """The trial function bound to one model (and compared method). Named per model and method: Tune
    registers trainables and with_parameters' objects job-wide by name, so concurrent searches must
    not share one."""

    def run(params: dict) -> None:
        trial(params, config=config, out=out, sampler=sampler, method=method or "cca")

    run.__name__ = run.__qualname__ = f"cca_trial_{key}" + (f"_{method}" if method else "")
    return run


def search_space(c: CCAConfig, method: str | None = None) -> dict:
    """lambda and lr for the sweep's CCA search; lr alone (the method's range) for a compared method
    (cca and random keep the config's dcm.lambda, so random draws as many components as that mask)."""
    from ray import tune

    def dist(r):
        return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)

    if method is None:
        return {"lambda": dist(c.tune.lambda_), "lr": dist(c.tune.lr)}
    return {"lr": dist(getattr(c.compare.lr, method) or c.tune.lr)}


def _reports(c: CCAConfig, method: str | None) -> int:
    """How many reports a trial makes (its validations + the final): ASHA's max_t."""
    from cca_ray.update.train import validation_steps

    if method in ("full_ft", "lora"):
        s = c.compare.sft
        return len(set(range(0, s.steps + 1, s.eval_every)) | {s.steps}) + 1
    return len(validation_steps(c.update.steps)) + 1


def make_tuner(key: str, c: CCAConfig, out: Path, sampler: Any, resume: bool, method: str | None = None):
    """The model's Tuner (restored from its experiment folder when resuming): the sweep's lambda x lr
    search, or, with ``method``, that compared method's lr search (compare.num_samples trials)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    r = c.resources
    trainable = tune.with_resources(
        model_trainable(key, c.model_dump(by_alias=True), str(out), sampler, method),
        tune.PlacementGroupFactory([_bundle(r.trial), _bundle(r.trainer)]))
    path = (out / "tune").resolve()
    name = EXPERIMENT if method is None else f"compare-{method}"
    if resume and tune.Tuner.can_restore(str(path / name)):
        log.info("resuming the Tune experiment in %s", path / name)
        return tune.Tuner.restore(str(path / name), trainable, resume_errored=True)
    t = c.tune
    search = None
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=t.seed)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=_reports(c, method),
                               grace_period=t.grace_period, reduction_factor=t.reduction_factor)
                 if t.scheduler == "asha" else FIFOScheduler())
    samples = t.num_samples if method is None else c.compare.num_samples
    concurrent = (t.max_concurrent_trials if method is None or c.compare.max_concurrent_trials is None
                  else c.compare.max_concurrent_trials)
    return tune.Tuner(
        trainable, param_space=search_space(c, method),
        tune_config=tune.TuneConfig(metric="objective", mode="max", search_alg=search, scheduler=scheduler,
                                    num_samples=samples, max_concurrent_trials=concurrent,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=str(path), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures)))


def _trial_rows(results) -> list[dict]:
    rows = []
    for res in results:
        m = res.metrics or {}
        cfg = res.config or {}
        rows.append({"trial_id": m.get("trial_id") or os.path.basename(str(res.path)),
                     "method": m.get("method"),
                     "lambda": m.get("lambda", cfg.get("lambda")), "lr": m.get("lr", cfg.get("lr")),
                     "val_accuracy": m.get("best_val"), "objective": m.get("objective"),
                     "components_fraction": m.get("components_fraction"),
                     "iterations": m.get("training_iteration"), "attempts": m.get("attempt"),
                     "status": ("ERROR" if res.error
                                else "TERMINATED" if m.get("done_update") else "STOPPED"),
                     "error": str(res.error)[:500] if res.error else None})
    return rows


def model_group(c: CCAConfig, path: str) -> tuple[Any, Any]:
    """The model's placement group (bundle 0: its SamplerActor, bundle 1: its evaluator) and the
    started SamplerActor."""
    from ray.util.placement_group import placement_group

    from actors.sampler import SamplerActor

    r = c.resources
    pg = placement_group([_bundle(r.sampler), _bundle(r.eval)], strategy="PACK")
    ray.get(pg.ready())
    sampler = SamplerActor.options(**actor_options(r.sampler, pg, 0)).remote(
        c.sampling.backend, path, c.model.dtype, c.evaluation.batch_size,
        max(c.sampling.max_new_tokens, c.evaluation.max_new_tokens))
    return pg, sampler


def tune_model(key: str, config: dict, out: str, resume: bool = False, progress: bool = False) -> dict:
    """One model of a sweep (a Ray task): shared stages once, the Tune search, the best config's
    test and general evaluation; writes and returns DIR/models/<key>/result.json's content."""
    from ray.util.placement_group import remove_placement_group

    from actors.evaluator import EvalActor
    from actors.sampler import SamplerClient
    from cca_ray.pipeline import Pipeline, model_path

    start = time.time()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    log_to(root / "run.log")
    c = parse_config(config)
    r = c.resources
    path, _ = model_path(c, progress)
    pg, sampler = model_group(c, path)
    try:
        pipe = Pipeline(c, root, progress, sampler=SamplerClient(sampler))
        prep = pipe.prepare()
        log.info("%s: shared stages ready (%d train pivots, %d held out); stages computed %s, reused %s",
                 key, len(prep.pivots), len(prep.heldout), pipe.store.computed, pipe.store.reused)
        results = make_tuner(key, c, root, sampler, resume).fit()
        trials = _trial_rows(results)
        best = results.get_best_result(metric="objective", mode="max", scope="all")
        params = {"lambda": best.config["lambda"], "lr": best.config["lr"]}
        chosen = trial_config(c.model_dump(by_alias=True), params)
        chosen = chosen.model_copy(update={"update": chosen.update.model_copy(
            update={"random_seeds": c.update.random_seeds})})
        evaluator = EvalActor.options(**actor_options(r.eval, pg, 1)).remote(
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


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster a job runs on (RAY_ADDRESS, set by `ray job submit`), the given address,
    or start a local Ray."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        ray.init(address="local", num_cpus=num_cpus)


def run_sweep(sweep_path: str | Path, out: str | Path, resume: bool = False, address: str | None = None,
              num_cpus: int | None = None) -> dict:
    """Every model of the sweep (concurrently up to max_concurrent_models), then the cross-model
    report. A model with a result.json is done; --resume picks up the others where they stopped."""
    from cca_ray.reports.sweep import build_sweep_report

    sweep, configs = load_sweep(sweep_path)
    out = Path(out).resolve()
    plan = out / "sweep_plan.json"
    if plan.is_file() and not resume:
        raise ConfigError(f"{out} already holds a sweep: add --resume to continue it, or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json({"sweep": str(Path(sweep_path).resolve()),
                "models": [{"model_key": m.key, "model": configs[m.key].model.name} for m in sweep.models]},
               plan)
    init_ray(address, num_cpus)
    job = ray.remote(num_cpus=0, max_retries=0)(tune_model)
    todo = [m.key for m in sweep.models if not _finished(out / "models" / m.key)]
    log.info("sweep: %d models, %d to run: %s", len(sweep.models), len(todo), todo)
    running: dict[Any, str] = {}
    while todo or running:
        while todo and len(running) < sweep.max_concurrent_models:
            key = todo.pop(0)
            config = configs[key].model_dump(by_alias=True)
            running[job.remote(key, config, str(out / "models" / key), resume)] = key
        done, _ = ray.wait(list(running), num_returns=1)
        key = running.pop(done[0])
        try:
            ray.get(done[0])
            log.info("sweep: %s finished", key)
        except Exception as exc:  # one model's failure does not stop the others
            log.error("sweep: %s failed: %s", key, exc)
            write_json({"model": configs[key].model.name, "model_key": key, "status": "failed",
                        "error": str(exc)[-2000:]}, out / "models" / key / "result.json")
    return build_sweep_report(out)


def display_name(key: str, c: CCAConfig) -> str:
    """The report's name of a model: its key, and what it is when the key does not say it."""
    from cca_ray.config import BUILTIN

    name = c.model.name
    if name == BUILTIN:
        steps = c.model.builtin_steps
        name = f"built-in tiny model ({f'{steps} training steps' if steps else 'default build'})"
    return key if key == name else f"{key}: {name}"


def _finished(model_dir: Path) -> bool:
    f = model_dir / "result.json"
    return f.is_file() and json.loads(f.read_text()).get("status") == "finished"


def compare_model(config: CCAConfig, out: str | Path, resume: bool = False, progress: bool = True,
                  address: str | None = None, num_cpus: int | None = None) -> dict:
    """`cca-ray compare`: the shared stages and CCA's mask once, then each method's lr search (the
    same number of trials each; one method after another, so each wall time is the method's own),
    then each method's chosen lr on the test split and the general suite. A finished method is
    kept in DIR/compare/<method>.json, so a rerun with --resume goes on with the next one."""
    from ray.util.placement_group import remove_placement_group

    from actors.evaluator import CompareEvalActor
    from actors.sampler import SamplerClient
    from cca_ray.config import dump_config
    from cca_ray.pipeline import Pipeline, model_path
    from cca_ray.reports.compare import build_comparison, write_comparison

    start = time.time()
    root = Path(out).resolve()
    if (root / "comparison.json").is_file() and not resume:
        raise ConfigError(f"{root} already holds a comparison: add --resume to reuse it, "
                          "or choose a new --out")
    root.mkdir(parents=True, exist_ok=True)
    log_to(root / "run.log")
    (root / "config.yaml").write_text(dump_config(config))
    init_ray(address, num_cpus)
    c, r = config, config.resources
    path, _ = model_path(c, progress)
    pg, sampler = model_group(c, path)
    methods: dict[str, dict] = {}
    try:
        pipe = Pipeline(c, root, progress, sampler=SamplerClient(sampler))
        prep = pipe.prepare()
        log.info("compare: shared stages ready (%d train pivots, %d held out); methods %s", len(prep.pivots),
                 len(prep.heldout), c.compare.methods)
        evaluator = CompareEvalActor.options(**actor_options(r.eval, pg, 1)).remote(
            c.model_dump(by_alias=True), str(root), sampler)
        base = ray.get(evaluator.base.remote())
        for method in c.compare.methods:
            done = root / "compare" / f"{method}.json"
            if resume and done.is_file():
                methods[method] = json.loads(done.read_text())
                log.info("compare: %s already finished (%s)", method, done)
                continue
            t0 = time.time()
            log.info("compare: %s: %d Tune trials over lr", method, c.compare.num_samples)
            results = make_tuner("compare", c, root, sampler, resume, method).fit()
            tune_s = time.time() - t0
            if not any(res.metrics and res.metrics.get("objective") is not None for res in results):
                errors = [str(res.error)[-800:] for res in results if res.error] or ["none"]
                raise RuntimeError(f"compare: no {method} trial reported a validation "
                                   f"(see {root / 'run.log'}); last error: {errors[-1]}")
            best = results.get_best_result(metric="objective", mode="max", scope="all")
            res = ray.get(evaluator.method.remote(method, best.config["lr"]))
            res |= {"tune_seconds": round(tune_s, 1), "wall_seconds": round(time.time() - t0, 1),
                    "trials": _trial_rows(results)}
            write_json(res, done)
            methods[method] = res
            log.info("compare: %s: lr %.3g, test %.4f (%.1f min)", method, res["lr"], res["test_accuracy"],
                     res["wall_seconds"] / 60)
        ray.kill(evaluator)
    finally:
        ray.kill(sampler)
        remove_placement_group(pg)
    report = build_comparison(display_name("compare", c).removeprefix("compare: "), base, methods,
                              {"trials_per_method": c.compare.num_samples,
                               "wall_seconds": round(time.time() - start, 1),
                               "shared_stages": {"computed": pipe.store.computed,
                                                 "reused": pipe.store.reused}})
    write_comparison(report, root)
    return report
