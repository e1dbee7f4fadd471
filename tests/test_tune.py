"""`cca-ray sweep` on a real local Ray (num_cpus=2): two models x 3 trials through the sampler,
trainer and eval actors, Tune (Optuna + ASHA), shared stages computed once per model, a trial whose
TrainerActor is killed is retried, the cross-model report; a sweep whose driver is killed resumes
without repeating finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from test_pipeline import _config

from cca_ray.config import load_sweep

pytestmark = pytest.mark.slow

TRIALS = 3  # per model in the sweep fixture: enough for a killed-and-retried trial among finished ones
SMALL_RESOURCES = {"sampler": {"num_cpus": 0.2}, "trainer": {"num_cpus": 0.3}, "eval": {"num_cpus": 0.2},
                   "trial": {"num_cpus": 0.05}}


def _model_config(small_model: Path, problems: Path, num_samples: int, concurrent: int) -> dict:
    raw = _config(small_model, problems, update={"lr_grid": [], "random_seeds": 0, "steps": 6})
    raw["evaluation"]["general_tasks"] = ["tinyworld_trivia"]
    raw["tune"] = {"lambda": {"low": 0.01, "high": 0.05}, "lr": {"low": 0.005, "high": 0.05},
                   "num_samples": num_samples, "max_concurrent_trials": concurrent, "grace_period": 2,
                   "max_failures": 1}
    raw["resources"] = SMALL_RESOURCES
    return raw


def _sweep_file(tmp: Path, model_cfg: dict, keys: list[str], concurrent_models: int = 2) -> Path:
    (tmp / "model.yaml").write_text(yaml.safe_dump(model_cfg))
    models = [{"key": k, "config": "model.yaml"} for k in keys]
    if len(keys) > 1:  # the second entry: the same model with its heads' rows updated too
        models[1]["overrides"] = {"update": {"kinds": ["v", "mlp"]}}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump({"models": models, "max_concurrent_models": concurrent_models}))
    load_sweep(path)  # the test's own sweep must validate
    return path


def _kill_first_trainer(stop: threading.Event, killed: list) -> None:
    """Kill one running TrainerActor from outside (as a lost node would), once."""
    while not stop.is_set() and not killed:
        names = [n for n in ray.util.list_named_actors() if n.startswith("trainer-")]
        if names:
            time.sleep(1.0)  # let it start its work
            try:
                ray.kill(ray.get_actor(names[0]))
                killed.append(names[0])
            except ValueError:  # it finished in the meantime
                pass
        time.sleep(0.2)


def _session(sid: int) -> list[int]:
    """Live processes of a session (zombies, state Z, are dead: a container's init may not reap them)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    rows = [line.split() for line in ps.splitlines()]
    return [int(r[0]) for r in rows if r[1] == str(sid) and not r[2].startswith("Z")]


@pytest.fixture(scope="module")
def sweep_run(small_model, problems_file, tmp_path_factory):
    from cca_ray.launch.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    config = _model_config(small_model, problems_file, TRIALS, 2)
    config["tune"]["loggers"] = {"mlflow": True}  # and TensorBoard, the default
    sweep = _sweep_file(tmp, config, ["small-a", "small-b"])
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_trainer, args=(stop, killed), daemon=True)
    killer.start()
    try:
        report = run_sweep(sweep, tmp / "out")
    finally:
        stop.set()
        ray.shutdown()
    return tmp / "out", report, killed


def test_sweep_reports_every_model(sweep_run):
    out, report, _ = sweep_run
    assert report["summary"] == report["summary"] | {"models": 2, "finished": 2, "failed": 0, "missing": 0}
    for key in ("small-a", "small-b"):
        m = report["models"][key]
        assert m["status"] == "finished" and m["trials"] >= TRIALS
        assert 0 <= m["base_test_accuracy"] <= 1 and 0 <= m["cca_test_accuracy"] <= 1
        assert abs(m["gain"] - (m["cca_test_accuracy"] - m["base_test_accuracy"])) < 1e-9
        assert 0.01 <= m["best_lambda"] <= 0.05 and 0.005 <= m["best_lr"] <= 0.05
        assert set(m["general_deltas"]) == {"tinyworld_trivia"}
        result = json.loads((out / "models" / key / "result.json").read_text())
        assert len(result["trials"]) == TRIALS
        # every trial worked in this model's own folder (trials of concurrent models kept apart)
        assert len(list((out / "models" / key / "trials").glob("*.attempts"))) == TRIALS
        # the best trial's lambda/lr are what the test evaluation used
        assert result["cca"]["lambda"] == m["best_lambda"] and result["cca"]["lr"] == m["best_lr"]
        # the evaluator's report carries the pivot diagnostics and the best updated step into result.json
        assert result["pivots"]["held_out"] >= 1 and result["cca"]["best_updated"]["step"] >= 1
    md = (out / "sweep_report.md").read_text()
    assert "small-a" in md and "small-b" in md
    for plot in report["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_stages_ran_once_per_model(sweep_run):
    out, _, _ = sweep_run
    for key in ("small-a", "small-b"):
        stages = out / "models" / key / "stages"
        for name in ("traces", "localize"):
            assert len([p for p in stages.glob(f"{name}-*") if p.is_dir()]) == 1, name
        log = (out / "models" / key / "run.log").read_text()
        assert log.count("stage traces: computing") == 1
        assert log.count("stage localize: computing") == 1
        # every trainer (TRIALS trials, one retried) reused them instead
        assert log.count("stage localize: reused") >= TRIALS
        # masks are cached per lambda: one dcm folder per distinct lambda, never more
        trials = json.loads((out / "models" / key / "result.json").read_text())["trials"]
        lambdas = {t["lambda"] for t in trials}
        assert len([p for p in stages.glob("dcm-*") if p.is_dir()]) == len(lambdas)


def test_killed_trial_is_retried(sweep_run):
    out, report, killed = sweep_run
    assert killed, "the test never saw a TrainerActor to kill"
    trials = [t for key in ("small-a", "small-b")
              for t in json.loads((out / "models" / key / "result.json").read_text())["trials"]]
    assert all(t["status"] != "ERROR" for t in trials), trials
    assert max(t["attempts"] or 1 for t in trials) == 2  # the killed trial ran again and finished


def test_tune_logs_for_tensorboard_and_mlflow(sweep_run):
    out, _, _ = sweep_run
    events = list((out / "models" / "small-a" / "tune").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event files under the Tune storage path"
    # tune.loggers.mlflow: an MLflow run per trial in the model's local store, named by model and search
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'models' / 'small-a' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("small-a-search").experiment_id])
    trials = json.loads((out / "models" / "small-a" / "result.json").read_text())["trials"]
    assert len(runs) >= len(trials)  # a retried trial may log a second run
    assert all("objective" in r.data.metrics for r in runs)


def test_killed_driver_resumes_without_repeating_finished_trials(small_model, problems_file, tmp_path):
    sweep = _sweep_file(tmp_path, _model_config(small_model, problems_file, 2, 1), ["solo"], 1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cca_ray.cli", "sweep", str(sweep), "--out", str(out), "--num-cpus", "2"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stages = out / "models" / "solo" / "stages"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(stages.glob("update-*/meta.json"))) < 1:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.5)
    finished_before = {p.parent.name: p.stat().st_mtime for p in stages.glob("update-*/meta.json")}
    assert finished_before
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    for pid in _session(proc.pid):  # a Ray process in its own process group, same session
        os.kill(pid, signal.SIGKILL)
    time.sleep(2)
    assert not _session(proc.pid), "processes of the killed sweep survived"
    assert not (out / "models" / "solo" / "result.json").exists()

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "models" / "solo" / "result.json").read_text())
    assert result["status"] == "finished" and len(result["trials"]) == 2
    for name, mtime in finished_before.items():  # finished updates were not recomputed
        assert (stages / name / "meta.json").stat().st_mtime == mtime, name
    log = (out / "models" / "solo" / "run.log").read_text()
    assert log.count("stage traces: computing") == 1
