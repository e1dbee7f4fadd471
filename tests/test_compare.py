"""`cca-ray compare` on a real local Ray (num_cpus=2): CCA, full fine-tuning (DeepSpeed ZeRO-2 on the
TrainerActor), LoRA, no-mask and random components, each with the same number of Tune trials over lr,
then each chosen lr on the test split and the general suite; the table's numbers are the run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_pipeline import _config
from test_tune import SMALL_RESOURCES

from cca_ray.cli import main
from cca_ray.config import METHODS, parse_config

pytestmark = pytest.mark.slow
TRIALS = 2
LR = {"cca": (0.005, 0.05), "random": (0.005, 0.05), "full_ft": (1e-4, 1e-3), "lora": (1e-3, 1e-2),
      "no_mask": (1e-3, 1e-2)}


@pytest.fixture(scope="module")
def compared(small_model, problems_file, tmp_path_factory) -> Path:
    import ray

    tmp = tmp_path_factory.mktemp("compare")
    raw = _config(small_model, problems_file, update={"lr_grid": [], "random_seeds": 2, "steps": 4})
    raw["evaluation"]["general_tasks"] = ["tinyworld_trivia"]
    raw["tune"] = {"lr": {"low": LR["cca"][0], "high": LR["cca"][1]}, "scheduler": "fifo",
                   "max_concurrent_trials": 2}
    raw["compare"] = {"num_samples": TRIALS,
                      "lr": {m: {"low": lo, "high": hi} for m, (lo, hi) in LR.items() if m != "cca"},
                      "sft": {"steps": 6, "eval_every": 3, "batch_size": 4, "zero_stage": 2}}
    raw["resources"] = SMALL_RESOURCES
    parse_config(raw)
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    try:
        assert main(["compare", "--config", str(config), "--out", str(tmp / "out"), "--num-cpus", "2",
                     "--quiet"]) == 0
    finally:
        ray.shutdown()
    return tmp / "out"


def _report(out: Path) -> dict:
    return json.loads((out / "comparison.json").read_text())


def test_every_method_is_in_the_table_with_its_fields(compared):
    r = _report(compared)
    assert list(r["methods"]) == list(METHODS)
    for name, m in r["methods"].items():
        for key in ("test_accuracy", "gain", "components_fraction", "params_changed_fraction",
                    "general_deltas", "wall_seconds"):
            assert key in m, (name, key)
        assert 0 <= m["test_accuracy"] <= 1
        assert m["gain"] == pytest.approx(m["test_accuracy"] - r["base"]["test_accuracy"], abs=1e-9)
        lo, hi = m["gain_ci95"]
        assert lo <= m["gain"] <= hi
        assert set(m["general_deltas"]) == {"tinyworld_trivia"}
        assert m["wall_seconds"] >= m["tune_seconds"] > 0


def test_each_method_gets_the_same_number_of_trials_in_its_own_lr_range(compared):
    r = _report(compared)
    for name, m in r["methods"].items():
        trials = m["trial_results"]
        assert len(trials) == TRIALS and m["trials"] == TRIALS, name
        assert all(t["method"] == name and t["status"] == "TERMINATED" for t in trials), trials
        lo, hi = LR[name]
        assert all(lo <= t["lr"] <= hi for t in trials), (name, trials)
        # the tested lr is the best trial's (by the objective, val accuracy)
        best = max(trials, key=lambda t: t["objective"])
        assert m["lr"] == best["lr"] and m["val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_fractions_of_components_and_parameters(compared, small_model):
    from transformers import AutoModelForCausalLM

    from cca_ray.update.sft import LORA_TARGETS

    model = AutoModelForCausalLM.from_pretrained(small_model)
    total = sum(p.numel() for p in model.parameters())
    r = _report(compared)
    m = r["methods"]
    assert r["parameters"] == total
    assert m["full_ft"]["params_changed_fraction"] == 1.0 and m["no_mask"]["params_changed_fraction"] == 1.0
    linears = [x for n, x in model.named_modules() if n.rsplit(".", 1)[-1] in LORA_TARGETS]
    lora = sum(16 * (x.in_features + x.out_features) for x in linears)
    assert m["lora"]["params_changed_fraction"] == pytest.approx(lora / total)
    assert 0 < m["cca"]["components_fraction"] < 1
    # random: as many components of each kind as CCA's mask, hence as many trained parameters
    assert m["random"]["components_fraction"] == m["cca"]["components_fraction"]
    assert m["random"]["trainable_parameters"] == m["cca"]["trainable_parameters"]
    assert m["cca"]["params_changed_fraction"] < m["lora"]["params_changed_fraction"] < 1
    assert m["cca"]["entries_changed"] <= m["cca"]["trainable_parameters"]
    assert len(m["random"]["seed_test_accuracies"]) == 2
    ratio = r["checks"]["lora_over_cca_params_changed"]
    assert ratio == pytest.approx(m["lora"]["params_changed_fraction"] / m["cca"]["params_changed_fraction"])


def test_markdown_and_plots_come_from_the_json(compared):
    from cca_ray.reports.compare import label

    r = _report(compared)
    md = (compared / "comparison.md").read_text()
    for name, m in r["methods"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {label(name)} |"))
        assert f"{100 * m['test_accuracy']:.2f}%" in row and f"{100 * m['gain']:+.2f}" in row
    for plot in ("gain_vs_params_changed.png", "general_deltas.png"):
        assert (compared / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_finetuning_ran_under_deepspeed_and_stages_were_shared(compared):
    log = (compared / "run.log").read_text()
    assert "training inside a DeepSpeed ZeRO-2 engine" in log
    assert log.count("stage traces: computing") == 1 and log.count("stage localize: computing") == 1
    assert len([p for p in (compared / "stages").glob("dcm-*") if p.is_dir()]) == 1  # one mask for all


def test_rerun_without_resume_refuses_to_overwrite(compared, capsys):
    config = compared.parent / "config.yaml"
    assert main(["compare", "--config", str(config), "--out", str(compared)]) == 2
    assert "--resume" in capsys.readouterr().err
