"""`cca-ray sweep`: every model of a sweep file, each a Ray task running its own Tune search
(launch/search.py), concurrently up to max_concurrent_models, then the cross-model report. A model
with a finished result.json is done; --resume picks the others up where they stopped."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ray

from cca_ray.config import ConfigError, load_sweep
from cca_ray.io import write_json
from cca_ray.launch.search import tune_model
from cca_ray.ray_base import init_ray

log = logging.getLogger("cca_ray")


def _finished(model_dir: Path) -> bool:
    f = model_dir / "result.json"
    return f.is_file() and json.loads(f.read_text()).get("status") == "finished"


def run_sweep(sweep_path: str | Path, out: str | Path, resume: bool = False, address: str | None = None,
              num_cpus: int | None = None) -> dict:
    """Every model of the sweep (concurrently up to max_concurrent_models), then the cross-model
    report; one model's failure is recorded in its result.json and does not stop the others."""
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
