"""`cca-ray run` end to end on a small real model: every stage, report.json's fields, the exported
model and its sparse delta, resuming after a kill during DCM, and the bad-input stops.

The small test model knows little arithmetic, so the data is built to give contrasting traces:
half the problems take the model's own greedy answer as gold (greedy right, samples with another
answer wrong), half take that answer + 1 (greedy wrong)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cca_ray.cli import main
from cca_ray.config import parse_config

TOKENS = 24


def _config(small_model: Path, problems: Path, **over) -> dict:
    raw = {
        "model": {"name": str(small_model)},
        "data": {"source": "jsonl", "path": str(problems), "n_shots": 0, "template_threshold": 0.9},
        "sampling": {"n_samples": 6, "temperature": 1.5, "max_new_tokens": TOKENS, "batch_size": 64},
        "localize": {"method": "prefix", "min_examples": 4},
        "dcm": {"lambda": 0.02, "lr": 0.05, "epochs": 30, "batch_size": 4},
        "update": {"lr": 0.01, "lr_grid": [0.01, 0.05], "steps": 6, "random_seeds": 2, "kinds": ["mlp"]},
        "evaluation": {"max_new_tokens": TOKENS, "general_tasks": ["tinyworld_trivia", "tinyworld_truthful"],
                       "limit": 8},
    }
    for section, values in over.items():
        raw[section] = raw.get(section, {}) | values
    return raw


def _write(tmp: Path, raw: dict) -> Path:
    parse_config(raw)  # the test's own config must be valid
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finished_run(small_model, problems_file, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    config = _write(tmp, _config(small_model, problems_file))
    assert main(["run", "--config", str(config), "--out", str(tmp / "out"), "--quiet"]) == 0
    return tmp / "out"


def test_report_has_every_field_as_fractions(finished_run):
    r = json.loads((finished_run / "report.json").read_text())
    for key in ("val_accuracy", "test_accuracy"):
        assert 0 <= r["base"][key] <= 1 and 0 <= r["cca"][key] <= 1
    cca = r["cca"]
    for key in ("lambda", "lr", "best_step", "components_selected", "components_total",
                "components_fraction", "params_changed_fraction", "p_value_vs_base", "p_value_vs_random"):
        assert key in cca
    assert cca["components_fraction"] == pytest.approx(cca["components_selected"] / cca["components_total"])
    assert 0 <= cca["p_value_vs_base"] <= 1 and 0 <= cca["p_value_vs_random"] <= 1
    assert cca["lr"] in (0.01, 0.05) and len(cca["lr_search"]) == 2
    assert len(r["random_control"]["seeds"]) == 2
    mean = sum(s["test_accuracy"] for s in r["random_control"]["seeds"]) / 2
    assert r["random_control"]["test_accuracy"] == pytest.approx(mean)
    assert r["localization"]["method"] == "prefix" and r["localization"]["examples"] >= 4
    assert set(r["general"]) == {"tinyworld_trivia", "tinyworld_truthful"}
    for g in r["general"].values():
        assert g["delta"] == pytest.approx(g["after"] - g["before"])
    for stage in ("data", "base_eval", "traces", "localize", "dcm", "update", "random_control",
                  "evaluation", "general"):
        assert r["timings"][stage] >= 0
    assert "CCA report" in (finished_run / "report.md").read_text()


def test_best_step_zero_means_nothing_changed(finished_run):
    r = json.loads((finished_run / "report.json").read_text())
    if r["cca"]["best_step"] == 0:
        assert r["cca"]["params_changed_fraction"] == 0
        assert r["cca"]["test_accuracy"] == r["base"]["test_accuracy"]
    else:
        assert 0 < r["cca"]["params_changed_fraction"] < 1


def test_exported_model_is_rebuilt_bit_for_bit_from_the_delta(finished_run, small_model, tmp_path):
    from safetensors.torch import load_file

    assert main(["apply-delta", str(small_model), str(finished_run / "cca_delta.safetensors"),
                 str(tmp_path / "rebuilt")]) == 0
    exported = load_file(str(finished_run / "cca_model" / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert exported.keys() == rebuilt.keys()
    assert all(torch.equal(exported[k], rebuilt[k]) for k in exported)


def test_rerun_reuses_every_stage_and_gives_the_same_report(finished_run, small_model, problems_file):
    before = json.loads((finished_run / "report.json").read_text())
    config = finished_run.parent / "config.yaml"
    assert main(["run", "--config", str(config), "--out", str(finished_run), "--quiet"]) == 0
    after = json.loads((finished_run / "report.json").read_text())
    log = (finished_run / "run.log").read_text()
    assert "stage dcm: reused" in log and "stage traces: reused" in log
    before["timings"].pop("total_this_invocation")
    after["timings"].pop("total_this_invocation")
    assert before == after


def test_kill_during_dcm_then_rerun_resumes_and_matches(finished_run, small_model, problems_file, tmp_path):
    """A fresh out folder, killed while DCM runs: the rerun reuses traces and localisation and
    ends with the same report as the uninterrupted run."""
    config = finished_run.parent / "config.yaml"
    out = tmp_path / "out"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cca_ray.cli", "run", "--config", str(config),
                             "--out", str(out), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        log = out / "run.log"
        if log.is_file() and "stage dcm: computing" in log.read_text():
            break
        assert proc.poll() is None, "the run ended before DCM started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()
    assert not list((out / "stages").glob("dcm-*[!l]"))  # only a .partial folder, if any
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    log = (out / "run.log").read_text().split("stage dcm: computing", 1)[1]
    assert "stage traces: reused" in log and "stage localize: reused" in log
    assert "stage traces: computing" not in log and "stage localize: computing" not in log
    a = json.loads((finished_run / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    for r in (a, b):
        r.pop("timings"), r.pop("exports")
    assert a == b


def test_no_contrasting_traces_stops_with_counts_and_keeps_earlier_stages(small_model, problems_file,
                                                                          tmp_path, capsys):
    raw = _config(small_model, problems_file, sampling={"n_samples": 1, "temperature": 0.0001})
    config = _write(tmp_path, raw)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "differs from greedy" in err and "raise sampling.n_samples" in err
    stages = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "out" / "stages").iterdir()}
    assert {"data", "base_eval", "traces"} <= stages


def test_too_few_localisation_examples_is_a_clear_stop(small_model, problems_file, tmp_path, capsys):
    config = _write(tmp_path, _config(small_model, problems_file, localize={"min_examples": 100_000}))
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "below localize.min_examples 100000" in capsys.readouterr().err


def test_unsupported_architecture_fails_before_any_stage(tmp_path, problems_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cca_ray.tiny.tokenizer import train_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(folder)
    train_tokenizer(["a b c 1 2 3"]).save_pretrained(folder)
    raw = _config(folder, problems_file)
    config = _write(tmp_path, raw)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not supported" in err and "llama" in err
    assert not (tmp_path / "out" / "stages").exists() or not any((tmp_path / "out" / "stages").iterdir())
