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
    kinds = r["localization"]["pivot_kinds"]
    assert set(kinds) == {"operation", "arithmetic", "other"}
    assert sum(kinds.values()) == r["localization"]["examples"]
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


STATS = {"n", "mean_logit_diff", "desired_wins", "base_wrong", "flip_rate"}
UPDATED = {"step", "lr", "val_accuracy", "test_accuracy", "delta_vs_base", "p_value_vs_base",
           "params_changed", "params_changed_fraction"}


def _check_best_updated(arm: dict, updated: dict, base_test: float) -> None:
    """best_updated is the best validated step >= 1 over the lr curves; beside the chosen step."""
    assert UPDATED <= set(updated) and updated["step"] >= 1
    assert set(arm["val_curves"]) == {"0.01", "0.05"}
    for curve in arm["val_curves"].values():
        assert [step for step, _ in curve] == [0, 2, 4, 6]
    later = [v for curve in arm["val_curves"].values() for step, v in curve if step >= 1]
    assert updated["val_accuracy"] == max(later)
    assert [updated["step"], updated["val_accuracy"]] in arm["val_curves"][f"{updated['lr']:g}"]
    assert arm["val_accuracy"] == max(v for curve in arm["val_curves"].values() for _, v in curve)
    assert 0 <= updated["test_accuracy"] <= 1 and 0 <= updated["p_value_vs_base"] <= 1
    assert updated["delta_vs_base"] == pytest.approx(updated["test_accuracy"] - base_test)
    if (updated["step"], updated["lr"]) == (arm["best_step"], arm["lr"]):
        assert updated["test_accuracy"] == arm["test_accuracy"]


def test_report_has_best_updated_steps_and_val_curves(finished_run):
    r = json.loads((finished_run / "report.json").read_text())
    cca, rnd, base_test = r["cca"], r["random_control"], r["base"]["test_accuracy"]
    _check_best_updated(cca, cca["best_updated"], base_test)
    p_seeds = cca["best_updated"]["p_values_vs_each_random_seed"]
    assert len(p_seeds) == 2 and cca["best_updated"]["p_value_vs_random"] == max(p_seeds)
    for row in cca["lr_search"]:
        assert row["best_updated_step"] >= 1 and row["best_updated_val"] <= row["best_val"]
        if row["best_step"] >= 1:
            assert (row["best_updated_step"], row["best_updated_val"]) == (row["best_step"], row["best_val"])
    for seed in rnd["seeds"]:
        _check_best_updated(seed, seed["best_updated"], base_test)
    mean = sum(s["best_updated"]["test_accuracy"] for s in rnd["seeds"]) / 2
    assert rnd["best_updated"]["test_accuracy"] == pytest.approx(mean)
    md = (finished_run / "report.md").read_text()
    assert "| CCA best updated step (lr" in md and "random components best updated step" in md
    assert "## Validation curves" in md


def test_report_has_pivot_diagnostics(finished_run):
    r = json.loads((finished_run / "report.json").read_text())
    p = r["pivots"]
    total = r["localization"]["examples"]
    assert (p["heldout_fraction"], p["seed"]) == (0.2, 0)
    assert p["held_out"] == round(0.2 * total) and p["train"] + p["held_out"] == total
    for name in ("train", "held_out"):
        assert set(p["base"][name]) == STATS and p["base"][name]["n"] == p[name]
        assert p["base"][name]["flip_rate"] in (0.0, None)  # the base flips nothing against itself
    arms = [(p["cca"], r["cca"])] + list(zip(p["random"], r["random_control"]["seeds"], strict=True))
    for entry, arm in arms:
        assert (entry["step"], entry["lr"]) == (arm["best_step"], arm["lr"])
        assert (entry["best_updated"]["step"], entry["best_updated"]["lr"]) == (arm["best_updated"]["step"],
                                                                                arm["best_updated"]["lr"])
        for name in ("train", "held_out"):
            assert set(entry[name]) == STATS and set(entry["best_updated"][name]) == STATS
            assert entry["best_updated"][name]["base_wrong"] == p["base"][name]["base_wrong"]
            if entry["step"] == 0:  # the chosen model is the base model: its numbers exactly
                assert entry[name] == p["base"][name]
    assert [s["seed"] for s in p["random"]] == [0, 1]
    md = (finished_run / "report.md").read_text()
    assert f"## Pivots: {p['train']} train, {p['held_out']} held out" in md and "| CCA best updated (lr" in md


def test_heldout_pivots_are_never_trained_on(finished_run):
    """DCM's mask is exactly the one learnt from the train pivots alone, and every update's first
    full-batch loss is minus the base model's mean logit difference over the train pivots alone."""
    from cca_ray.config import load_config
    from cca_ray.dcm import learn_mask
    from cca_ray.localize import Pivot
    from cca_ray.pipeline.run import Pipeline, pivot_examples

    r = json.loads((finished_run / "report.json").read_text())
    pipe = Pipeline(load_config(finished_run.parent / "config.yaml"), finished_run, progress=False)
    prep = pipe.prepare()
    assert pipe.store.computed == []
    stored = [Pivot.from_row(json.loads(line)) for line in
              (pipe.store.path("localize", prep.loc_key) / "localization.jsonl").read_text().splitlines()]
    train = {(q.template_id, q.instance_id) for q in prep.pivots}
    held = {(q.template_id, q.instance_id) for q in prep.heldout}
    assert len(train) == len(prep.pivots) and len(held) == len(prep.heldout) == r["pivots"]["held_out"] > 0
    assert train.isdisjoint(held) and train | held == {(q.template_id, q.instance_id) for q in stored}

    c, pad = pipe.config.dcm, pipe.m.tokenizer.pad_token_id
    masks = pipe.dcm(prep).masks

    def learnt(pivots):
        return learn_mask(pipe.m.model, pivot_examples(pivots), pad, lam=c.lambda_, lr=c.lr, epochs=c.epochs,
                          batch_size=c.batch_size, lr_step_epochs=c.lr_step_epochs, lr_gamma=c.lr_gamma,
                          early_stop_fraction=c.early_stop_fraction, seed=c.seed, progress=False).masks

    assert all(torch.equal(masks[k], m) for k, m in learnt(prep.pivots).items())
    assert not all(torch.equal(masks[k], m) for k, m in learnt(stored).items())  # the check can tell

    base = r["pivots"]["base"]
    train_loss = -base["train"]["mean_logit_diff"]
    held_loss = -base["held_out"]["mean_logit_diff"]
    all_loss = (train_loss * len(train) + held_loss * len(held)) / (len(train) + len(held))
    assert abs(train_loss - all_loss) > 1e-3
    runs = [d for d in (finished_run / "stages").glob("update-*") if "random" in d.name or "cca" in d.name]
    assert len(runs) == 6  # cca and two random seeds, two lrs each
    no_mask = pipe.method_run("no_mask", 0.01, prep)
    for folder in [*runs, Path(no_mask["path"])]:
        history = json.loads((folder / "history.json").read_text())
        assert history[1]["loss"] == pytest.approx(train_loss, abs=1e-4), folder.name


def test_exported_model_is_rebuilt_bit_for_bit_from_the_delta(finished_run, small_model, tmp_path):
    from safetensors.torch import load_file

    assert main(["apply-delta", str(small_model), str(finished_run / "cca_delta.safetensors"),
                 str(tmp_path / "rebuilt")]) == 0
    exported = load_file(str(finished_run / "cca_model" / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert exported.keys() == rebuilt.keys()
    assert all(torch.equal(exported[k], rebuilt[k]) for k in exported)


def test_the_runs_lora_adapter_merges_to_its_exported_model(finished_run, small_model):
    """DIR/cca_lora (written when the chosen step changed the model) is cca_model/ as a peft adapter."""
    r = json.loads((finished_run / "report.json").read_text())
    if r["cca"]["best_step"] == 0:
        assert "lora" not in r["exports"] and not (finished_run / "cca_lora").exists()
        return
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, finished_run / "cca_lora").merge_and_unload().state_dict()
    exported = load_file(str(finished_run / "cca_model" / "model.safetensors"))
    assert all(torch.allclose(merged[k], w, atol=1e-6, rtol=0) for k, w in exported.items())
    assert r["exports"]["lora_max_rank"] >= 1


def test_lm_eval_results_files_hold_the_reported_scores(finished_run):
    """Each general stage keeps lm-eval's own results file (lm_eval/<arm>/results_<date>.json, what
    lm-eval's --output_path writes), and the report's before/after scores are the ones in it."""
    r = json.loads((finished_run / "report.json").read_text())
    for arm, field in (("base", "before"), ("cca", "after")):
        files = list((finished_run / "stages").glob(f"general-{arm}-*/lm_eval/{arm}/results_*.json"))
        assert len(files) == 1, arm
        doc = json.loads(files[0].read_text())
        assert {"results", "configs", "versions"} <= set(doc)
        for task, g in r["general"].items():
            key = next(k for k in doc["results"][task] if k.split(",")[0] == g["metric"])
            assert doc["results"][task][key] == pytest.approx(g[field]), (arm, task)


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


def test_stage_folders_are_the_configs_keys_and_a_change_recomputes_only_its_stages(finished_run, tmp_path):
    """The stage folders of a real run are named by pipeline/keys.py (so test_stage_keys's table holds
    for real runs); a copy of the run folder, rerun with another evaluation.limit, recomputes the
    general suite and nothing else, and its report differs in the general suite only."""
    import re
    import shutil

    from test_stage_keys import stage_keys

    from cca_ray.config import load_config
    from cca_ray.pipeline import keys

    c = load_config(finished_run.parent / "config.yaml")
    before = json.loads((finished_run / "report.json").read_text())
    folders = {p.name for p in (finished_run / "stages").iterdir() if p.is_dir()}
    k = stage_keys(c, before["data"]["templates_kept"], lrs=(0.01, 0.05))
    expected = {f"{name}-{k[name]}" for name in ("data", "base_eval", "traces", "localize", "dcm")}
    expected |= {f"update-cca-lr{lr:g}-{k[f'update-cca-{lr}']}" for lr in (0.01, 0.05)}
    expected |= {f"update-random0-lr{lr:g}-{k[f'update-random0-{lr}']}" for lr in (0.01, 0.05)}
    expected |= {f"update-random1-lr{lr:g}-{keys.rows_update_key(c, k['dcm'], 'random1', lr)}"
                 for lr in (0.01, 0.05)}
    assert expected <= folders

    out = tmp_path / "moved"
    shutil.copytree(finished_run, out)
    raw = yaml.safe_load((finished_run.parent / "config.yaml").read_text())
    config = _write(tmp_path, raw | {"evaluation": raw["evaluation"] | {"limit": 5}})
    logged = len((out / "run.log").read_text())
    assert main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    computed = re.findall(r"stage (\S+): computing", (out / "run.log").read_text()[logged:])
    assert sorted(computed) == ["general-base", "general-cca"]
    after = json.loads((out / "report.json").read_text())
    assert after["general"] != before["general"]
    for r in (before, after):
        for field in ("general", "timings", "exports", "config"):
            r.pop(field)
    assert after == before


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
