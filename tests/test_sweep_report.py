"""The sweep report on synthetic per-model results: the JSON fields and values, the markdown rows,
valid PNG plots, failed and missing models, odd inputs that must not crash, and identical rebuilds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cca_ray.reports.sweep import build_sweep_report, render_sweep_markdown, use_log_x

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _trial(tid: str, lam: float, lr: float, val: float | None, frac: float | None = 0.04,
           status: str = "TERMINATED") -> dict:
    return {"trial_id": tid, "lambda": lam, "lr": lr, "val_accuracy": val, "components_fraction": frac,
            "status": status, "iterations": 8}


ALPHA = {
    "model": "Alpha 1B", "model_key": "alpha", "status": "finished",
    "base": {"test_accuracy": 0.4453, "val_accuracy": 0.47},
    "cca": {"test_accuracy": 0.4700, "val_accuracy": 0.49, "lambda": 0.05, "lr": 0.01, "best_step": 4,
            "components_fraction": 0.042, "components_selected": 88, "params_changed_fraction": 0.0076,
            "p_value_vs_base": 0.3},
    "general": {"arc_easy": {"before": 0.44, "after": 0.43, "delta": -0.01, "stderr": 0.02, "metric": "acc"},
                "hellaswag": {"before": 0.30, "after": 0.305, "delta": 0.005, "stderr": 0.004,
                              "metric": "acc"}},
    "wall_seconds": 512.3,
    "trials": [_trial("a1", 0.05, 0.01, 0.49), _trial("a2", 0.2, 0.001, 0.46, frac=None),
               _trial("a3", 0.01, 0.1, 0.41), _trial("a4", 0.5, 0.03, None, frac=None, status="ERROR")],
}

BETA = {
    "model": "Beta 3B", "model_key": "beta", "status": "finished",
    "base": {"test_accuracy": 0.60, "val_accuracy": 0.61},
    "cca": {"test_accuracy": 0.58, "val_accuracy": 0.62, "lambda": 0.2, "lr": 0.003, "best_step": 2,
            "components_fraction": 0.0015, "components_selected": 3, "params_changed_fraction": 0.0002,
            "p_value_vs_base": 0.5},
    "general": {},
    "wall_seconds": 61.6,
    "trials": [_trial("b1", 0.2, 0.003, 0.62), _trial("b2", 0.02, 0.03, 0.55)],
}

GAMMA = {"model": "Gamma 7B", "model_key": "gamma", "status": "failed",
         "error": "CUDA out of memory | while loading\nshard 3", "wall_seconds": 30.0, "trials": []}

PLAN = {"models": [{"model_key": "alpha", "model": "Alpha 1B"}, {"model_key": "beta", "model": "Beta 3B"},
                   {"model_key": "gamma", "model": "Gamma 7B"}, {"model_key": "delta", "model": "Delta 8B"}]}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _sweep(root: Path, results: dict[str, dict], plan: dict | None = PLAN) -> Path:
    for key, result in results.items():
        _write(root / "models" / key / "result.json", result)
    if plan is not None:
        _write(root / "sweep_plan.json", plan)
    return root


@pytest.fixture
def sweep(tmp_path) -> Path:
    return _sweep(tmp_path / "sweep", {"alpha": ALPHA, "beta": BETA, "gamma": GAMMA})


def _row(md: str, name: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, f"expected one row for {name}, got {rows}"
    return [c.strip() for c in re.split(r"(?<!\\)\|", rows[0])[1:-1]]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000, path
    assert data[:8] == PNG_MAGIC, path
    import matplotlib.image

    img = matplotlib.image.imread(path)  # decodes the whole file: a truncated PNG raises
    assert img.shape[0] > 50 and img.shape[1] > 50


def test_json_fields_and_values(sweep):
    report = build_sweep_report(sweep)
    assert report == json.loads((sweep / "sweep_report.json").read_text(encoding="utf-8"))
    models = report["models"]
    assert list(models) == ["alpha", "beta", "gamma", "delta"]  # plan order

    a = models["alpha"]
    assert a["model"] == "Alpha 1B" and a["status"] == "finished" and a["error"] is None
    assert a["base_test_accuracy"] == 0.4453 and a["cca_test_accuracy"] == 0.47
    assert a["gain"] == pytest.approx(0.47 - 0.4453)
    assert (a["best_lambda"], a["best_lr"], a["components_fraction"]) == (0.05, 0.01, 0.042)
    assert a["general_deltas"] == {"arc_easy": {"delta": -0.01, "stderr": 0.02},
                                   "hellaswag": {"delta": 0.005, "stderr": 0.004}}
    assert a["wall_seconds"] == 512.3 and a["trials"] == 4

    b = models["beta"]
    assert b["gain"] == pytest.approx(-0.02) and b["gain"] < 0
    assert (b["best_lambda"], b["best_lr"], b["components_fraction"]) == (0.2, 0.003, 0.0015)
    assert b["general_deltas"] == {} and b["trials"] == 2

    g = models["gamma"]
    assert g["status"] == "failed" and "out of memory" in g["error"]
    assert g["base_test_accuracy"] is None and g["cca_test_accuracy"] is None and g["gain"] is None
    assert g["best_lambda"] is None and g["trials"] == 0 and g["wall_seconds"] == 30.0

    d = models["delta"]
    assert d["model"] == "Delta 8B" and d["status"] == "missing" and d["gain"] is None and d["trials"] == 0

    assert report["summary"] == {"models": 4, "finished": 2, "failed": 1, "missing": 1,
                                 "mean_gain": pytest.approx(((0.47 - 0.4453) + (0.58 - 0.60)) / 2)}


def test_markdown_rows(sweep):
    build_sweep_report(sweep)
    md = (sweep / "sweep_report.md").read_text(encoding="utf-8")
    assert _row(md, "Alpha 1B") == ["Alpha 1B", "44.5%", "47.0%", "+2.5", "4.2", "0.05", "0.01",
                                    "arc_easy: -1.0 ± 2.0; hellaswag: +0.5 ± 0.4", "8:32"]
    assert _row(md, "Beta 3B") == ["Beta 3B", "60.0%", "58.0%", "-2.0", "0.15", "0.2", "0.003", "-", "1:02"]
    gamma = _row(md, "Gamma 7B")
    assert gamma[1] == "failed" and gamma[-1] == "0:30" and len(gamma) == 9
    delta = _row(md, "Delta 8B")
    assert delta[1] == "missing" and len(delta) == 9
    assert "4 models: 2 finished, 1 failed, 1 missing; mean gain over finished models +0.2 points" in md
    # the error is on one line, its pipe escaped, so it cannot break the page
    assert "- Gamma 7B: CUDA out of memory \\| while loading shard 3" in md
    for rel in ["plots/gain_vs_components.png", "plots/landscape_alpha.png", "plots/landscape_beta.png",
                "plots/regression_deltas.png"]:
        assert f"]({rel})" in md


def test_plots_are_valid_pngs(sweep):
    report = build_sweep_report(sweep)
    assert report["plots"] == ["plots/gain_vs_components.png", "plots/landscape_alpha.png",
                               "plots/landscape_beta.png", "plots/regression_deltas.png"]
    for rel in report["plots"]:
        _assert_png(sweep / rel)
    # the failed model (no trials) and the missing one get no landscape; no temp files are left
    written = sorted(p.name for p in (sweep / "plots").iterdir())
    assert written == sorted(Path(p).name for p in report["plots"])


def test_rebuild_is_identical(sweep):
    first = build_sweep_report(sweep)
    json1 = (sweep / "sweep_report.json").read_bytes()
    md1 = (sweep / "sweep_report.md").read_bytes()
    second = build_sweep_report(sweep)
    assert second == first
    assert (sweep / "sweep_report.json").read_bytes() == json1
    assert (sweep / "sweep_report.md").read_bytes() == md1


def test_render_markdown_alone():
    report = {
        "models": {"m": {"model": "M", "status": "finished", "error": None, "base_test_accuracy": 0.5,
                         "cca_test_accuracy": 0.5, "gain": 0.0, "components_fraction": 0.0,
                         "best_lambda": 1e-3, "best_lr": 3e-5, "general_deltas": {"t": {"delta": -0.001,
                                                                                      "stderr": None}},
                         "wall_seconds": 3725.4, "trials": 1}},
        "summary": {"models": 1, "finished": 1, "failed": 0, "missing": 0, "mean_gain": None},
        "plots": [],
    }
    md = render_sweep_markdown(report)
    assert _row(md, "M") == ["M", "50.0%", "50.0%", "+0.0", "0", "0.001", "3e-05", "t: -0.1", "62:05"]
    assert "mean gain over finished models n/a" in md
    assert "## Plots" not in md and "## Errors" not in md


def test_no_general_tasks_no_plan_and_odd_inputs(tmp_path):
    """No plan, no general tasks anywhere, a model without trials, a bad result.json, a folder
    without a result, NaN and non-numbers: statuses are right and every plot is still written."""
    lonely = dict(BETA, model="Lonely", model_key="lonely", trials=[],
                  cca=dict(BETA["cca"], components_fraction=float("nan"), lr="fast"))
    single = dict(BETA, model="Single", trials=[_trial("s1", 0.1, 0.01, 0.5), _trial("s0", 0.0, 0.01, 0.6)])
    root = _sweep(tmp_path / "s", {"beta": BETA, "lonely": lonely, "single": single}, plan=None)
    (root / "models" / "broken").mkdir()
    (root / "models" / "broken" / "result.json").write_text("{not json", encoding="utf-8")
    (root / "models" / "running").mkdir()

    report = build_sweep_report(root)
    models = report["models"]
    assert list(models) == ["beta", "broken", "lonely", "running", "single"]  # sorted without a plan
    assert models["broken"]["status"] == "failed" and "unreadable" in models["broken"]["error"]
    assert models["running"]["status"] == "missing"
    assert models["lonely"]["components_fraction"] is None and models["lonely"]["best_lr"] is None
    assert models["lonely"]["gain"] == pytest.approx(-0.02)
    assert models["single"]["trials"] == 2
    assert report["summary"]["finished"] == 3 and report["summary"]["failed"] == 1
    assert report["summary"]["missing"] == 1 and report["summary"]["models"] == 5
    # lambda 0 cannot sit on a log axis: that trial is left out, the other one still plotted
    assert report["plots"] == ["plots/gain_vs_components.png", "plots/landscape_beta.png",
                               "plots/landscape_single.png", "plots/regression_deltas.png"]
    for rel in report["plots"]:
        _assert_png(root / rel)
    json.loads((root / "sweep_report.json").read_text(encoding="utf-8"))  # NaN never reaches the JSON
    assert "NaN" not in (root / "sweep_report.json").read_text(encoding="utf-8")


def test_empty_sweep(tmp_path):
    report = build_sweep_report(tmp_path)
    assert report["models"] == {}
    assert report["summary"] == {"models": 0, "finished": 0, "failed": 0, "missing": 0, "mean_gain": None}
    for rel in report["plots"]:
        _assert_png(tmp_path / rel)
    assert "0 models" in (tmp_path / "sweep_report.md").read_text(encoding="utf-8")


def test_log_x_only_when_fractions_span_more_than_10x():
    assert use_log_x([0.001, 0.042])
    assert not use_log_x([0.01, 0.05])
    assert not use_log_x([0.0, 0.5])
    assert not use_log_x([])


def test_cli_report_rebuilds_and_refuses_a_non_sweep_folder(sweep, tmp_path, capsys):
    from cca_ray.cli import main

    (sweep / "sweep_report.json").unlink(missing_ok=True)
    assert main(["report", str(sweep)]) == 0
    assert json.loads((sweep / "sweep_report.json").read_text())["summary"]["models"] >= 2
    assert "| model |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
