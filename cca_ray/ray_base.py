"""The Ray pieces every system shares (CCA and circuits): joining or starting Ray, actor options and
placement-group bundles from a `Resources` section, Tune distributions from a `Range`, search
algorithms, and the rows a finished Tune experiment reports. Nothing here knows about CCA."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster a job runs on (RAY_ADDRESS, set by `ray job submit`), the given address,
    or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        ray.init(address="local", num_cpus=num_cpus)


def bundle(r) -> dict:
    """A placement-group bundle holding resources ``r`` (a config `Resources`)."""
    return {"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {})}


def actor_options(r, pg: Any = None, bundle_index: int = 0, **extra: Any) -> dict:
    """Ray options of an actor or task with resources ``r``, placed in bundle ``bundle_index`` of
    ``pg``. Ray gives a process with a fraction of a CPU one OpenMP thread; ``r.threads`` sets
    OMP_NUM_THREADS explicitly (vLLM's CPU worker binds its own threads whatever this says)."""
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, **extra}
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=bundle_index)
    if r.threads:
        opts["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(r.threads)}}
    return opts


def distribution(r) -> Any:
    """The Tune distribution of a config `Range` (log-uniform or uniform between low and high)."""
    from ray import tune

    if r.integer:  # randint's upper bound is exclusive; lograndint needs low >= 1
        low, high = int(r.low), int(r.high) + 1
        return tune.lograndint(low, high) if r.log else tune.randint(low, high)
    return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)


def search_algorithm(kind: str, seed: int | None, points: list[dict] | None = None) -> Any:
    """Tune's search algorithm by config name: "optuna" (TPE) or random search ("random" or
    None for Tune's default variant generator); ``points`` are evaluated first."""
    if kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=points, seed=seed)
    if points:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=points, random_state=seed)
    return None


def result_rows(results, row: Callable[[dict, dict], dict]) -> list[dict]:
    """One dict per trial of a Tune ResultGrid: ``row(metrics, config)`` plus the trial id (from the
    metrics or the trial folder) and its error (cut to 500 characters)."""
    rows = []
    for res in results:
        m, cfg = res.metrics or {}, res.config or {}
        rows.append({"trial_id": m.get("trial_id") or os.path.basename(str(res.path)), **row(m, cfg),
                     "error": str(res.error)[:500] if res.error else None})
    return rows


def logger_callbacks(loggers, out: str | os.PathLike, experiment: str) -> list:
    """Tune's logger callbacks as ``loggers`` (a config.LoggersSection) chooses: CSV and JSON always,
    TensorBoard and MLflow (a local SQLite store, ``out``/mlflow.db, unless a tracking URI is set:
    MLflow 3 refuses its old ./mlruns directory store unless MLFLOW_ALLOW_FILE_STORE=true).
    Tune's automatic loggers are switched off so that TensorBoard can be: Tune then uses these only."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # read by the driver's Tuner.fit()
    callbacks: list = [CSVLoggerCallback(), JsonLoggerCallback()]
    if loggers.tensorboard:
        callbacks.append(TBXLoggerCallback())
    if loggers.mlflow:
        try:
            import mlflow  # noqa: F401
        except ImportError as e:
            raise RuntimeError("loggers.mlflow is on but mlflow is not installed: pip install "
                               "mlflow-skinny (or mlflow), or set loggers.mlflow: false") from e
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = loggers.mlflow_tracking_uri or f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri,
                                              experiment_name=loggers.mlflow_experiment or experiment))
    return callbacks
