"""Tune's logger callbacks as the config chooses them (`ray_base.logger_callbacks`), on a real local
Ray: TensorBoard event files on by default and off when asked; an MLflow run per trial in a local file
store (SQLite), written offline, with the trials' metrics at every step."""

from __future__ import annotations

from pathlib import Path

import pytest

from cca_ray.config import LoggersSection, TuneSection
from cca_ray.ray_base import logger_callbacks

pytestmark = pytest.mark.slow


def _search(out: Path, name: str, loggers: LoggersSection) -> None:
    """Three trials of a toy trainable, each reporting 'objective' at 4 steps."""
    from ray import tune

    def trainable(config: dict) -> None:
        for step in range(4):
            tune.report({"objective": config["x"] * (step + 1)})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.5}),
        param_space={"x": tune.grid_search([1.0, 2.0, 3.0])},
        tune_config=tune.TuneConfig(metric="objective", mode="max"),
        run_config=tune.RunConfig(name=name, storage_path=str(out / "tune"), verbose=0,
                                  callbacks=logger_callbacks(loggers, out, name)))
    grid = tuner.fit()
    assert not grid.errors and len(grid) == 3


def _trials(experiment: Path) -> list[Path]:
    return [p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("trainable")]


def test_tensorboard_is_on_by_default_and_mlflow_writes_a_local_file_store(local_ray, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    loggers = TuneSection().loggers.model_copy(update={"mlflow": True})
    assert loggers.tensorboard  # the default
    _search(tmp_path, "toy", loggers)
    trials = _trials(tmp_path / "tune" / "toy")
    assert len(trials) == 3
    for trial in trials:
        assert list(trial.glob("events.out.tfevents.*")), trial
        assert (trial / "progress.csv").exists() and (trial / "result.json").exists()
    store = tmp_path / "mlflow.db"  # MLflow's local file store: one SQLite file, no server
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("toy")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    finals = sorted(r.data.metrics["objective"] for r in runs)
    assert finals == [4.0, 8.0, 12.0]  # each trial's last report: x * 4
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "objective")
        assert [h.step for h in history] == [1, 2, 3, 4]
        assert float(r.data.params["x"]) * 4 == r.data.metrics["objective"]
        assert r.info.status == "FINISHED"


def test_tensorboard_off_writes_no_event_files_but_keeps_tunes_own_logs(local_ray, tmp_path):
    _search(tmp_path, "quiet", LoggersSection(tensorboard=False))
    trials = _trials(tmp_path / "tune" / "quiet")
    assert len(trials) == 3
    assert not list((tmp_path / "tune").rglob("events.out.tfevents.*"))
    for trial in trials:
        assert (trial / "progress.csv").exists() and (trial / "result.json").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_mlflow_missing_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(RuntimeError, match="pip install mlflow-skinny"):
        logger_callbacks(LoggersSection(mlflow=True), tmp_path, "x")
