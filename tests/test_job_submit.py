"""`ray job submit` of a sweep to a local head (`ray start --head`), with Ray's token auth, as the
README documents it; the job's sweep writes its report where the command said."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_pipeline import _config

from cca_ray.config import load_sweep

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_sweep_on_a_local_head(small_model, problems_file, tmp_path):
    raw = _config(small_model, problems_file, update={"lr_grid": [], "random_seeds": 0, "steps": 2})
    raw["evaluation"]["general_tasks"] = []
    # one trial, from a lambda range where this model's mask keeps components (a larger lambda can
    # select none, and that trial fails by design)
    raw["tune"] = {"num_samples": 1, "max_concurrent_trials": 1, "search": "random", "scheduler": "fifo",
                   "lambda": {"low": 0.01, "high": 0.05}}
    raw["resources"] = {"sampler": {"num_cpus": 0.2}, "trainer": {"num_cpus": 0.3}, "eval": {"num_cpus": 0.2},
                        "trial": {"num_cpus": 0.05}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"models": [{"key": "small", "config": "model.yaml"}]}))
    load_sweep(sweep)
    out = tmp_path / "out"

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    start = [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}",
             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"]
    # --block in its own session: every process of this head shares one process group, so the test
    # stops exactly this head (`ray stop` would stop every Ray of the user)
    head = subprocess.Popen(start, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError as exc:  # it answers: up (401 without the token: auth is on)
                assert exc.code == 401, exc
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, "the Ray head did not start"
                time.sleep(1)
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                  "--working-dir", str(REPO), "--", "cca-ray", "sweep", str(sweep), "--out", str(out)]
        # the dashboard answers before its job agent is up (slower on a loaded machine): Ray's own
        # "No available agent to submit job, please try again later" is retried, nothing else
        while True:
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode == 0 or "No available agent" not in done.stderr + done.stdout:
                break
            assert time.time() < deadline, "the head's job agent did not come up"
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert "succeeded" in done.stdout.lower()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    report = json.loads((out / "sweep_report.json").read_text())
    assert report["summary"]["finished"] == 1
    assert report["models"]["small"]["trials"] == 1
