"""The cross-model report of a sweep: sweep_report.json, sweep_report.md and plots/, built from the
finished per-model results so a sweep can be compared at a glance (and rebuilt at any time).

Input: DIR/models/<model_key>/result.json per model that ended (status "finished" or "failed") and,
if present, DIR/sweep_plan.json listing every model of the sweep; planned models without a result
(still running or never finished) are reported as "missing". Fractions stay in [0, 1] in the JSON;
the markdown and the plots show accuracy points and percentages.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from cca_ray.io import atomic_write, write_json
from cca_ray.reports.plots import figure, log_axis, save_png

REPORT_JSON = "sweep_report.json"
REPORT_MD = "sweep_report.md"
PLOTS_DIR = "plots"
GAIN_PLOT = f"{PLOTS_DIR}/gain_vs_components.png"
DELTAS_PLOT = f"{PLOTS_DIR}/regression_deltas.png"


# ---------------------------------------------------------------------------------------------- reading


def _num(x: Any) -> float | int | None:
    """A finite number or None: strings, booleans, NaN and infinities never reach the report."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return x


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _read_plan(out_dir: Path) -> list[tuple[str, str]]:
    """(model_key, display name) per model of sweep_plan.json, in plan order; [] without a plan."""
    path = out_dir / "sweep_plan.json"
    if not path.is_file():
        return []
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from e
    entries = []
    for m in _dict(plan).get("models", []):
        if isinstance(m, str):
            entries.append((m, m))
        elif isinstance(m, dict) and m.get("model_key"):
            entries.append((str(m["model_key"]), str(m.get("model") or m["model_key"])))
    return entries


def _read_results(out_dir: Path) -> dict[str, dict | None]:
    """model_key (folder name) -> parsed result.json, or None for a model folder without one.

    An unreadable result.json becomes a failed result carrying the read error."""
    models = out_dir / "models"
    results: dict[str, dict | None] = {}
    if not models.is_dir():
        return results
    for folder in sorted(p for p in models.iterdir() if p.is_dir()):
        path = folder / "result.json"
        if not path.is_file():
            results[folder.name] = None
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            data = {"status": "failed", "error": f"unreadable result.json: {e}"}
        if not isinstance(data, dict):
            data = {"status": "failed", "error": "result.json is not a JSON object"}
        results[folder.name] = data
    return results


# --------------------------------------------------------------------------------------------- building


def _missing_entry(name: str) -> dict:
    return {"model": name, "status": "missing", "error": None, "base_test_accuracy": None,
            "cca_test_accuracy": None, "gain": None, "components_fraction": None, "best_lambda": None,
            "best_lr": None, "general_deltas": {}, "wall_seconds": None, "trials": 0}


def _model_entry(name: str, result: dict | None) -> dict:
    """One model's row of the report: the headline numbers of its result.json, None where absent."""
    if result is None:
        return _missing_entry(name)
    base, cca = _dict(result.get("base")), _dict(result.get("cca"))
    base_acc, cca_acc = _num(base.get("test_accuracy")), _num(cca.get("test_accuracy"))
    gain = None if base_acc is None or cca_acc is None else round(cca_acc - base_acc, 10)
    general = {str(task): {"delta": _num(_dict(g).get("delta")), "stderr": _num(_dict(g).get("stderr"))}
               for task, g in sorted(_dict(result.get("general")).items())}
    trials = result.get("trials")
    error = result.get("error")
    return {"model": str(result.get("model") or name), "status": str(result.get("status") or "failed"),
            "error": None if error is None else str(error), "base_test_accuracy": base_acc,
            "cca_test_accuracy": cca_acc, "gain": gain,
            "components_fraction": _num(cca.get("components_fraction")),
            "best_lambda": _num(cca.get("lambda")), "best_lr": _num(cca.get("lr")),
            "general_deltas": general, "wall_seconds": _num(result.get("wall_seconds")),
            "trials": len(trials) if isinstance(trials, list) else 0}


def _summary(models: dict[str, dict]) -> dict:
    """Counts per status and the mean gain over finished models that have both accuracies. A status
    other than finished/failed/missing (written by a newer driver) counts in "models" only."""
    statuses = [m["status"] for m in models.values()]
    gains = [m["gain"] for m in models.values() if m["status"] == "finished" and m["gain"] is not None]
    return {"models": len(models), "finished": statuses.count("finished"),
            "failed": statuses.count("failed"), "missing": statuses.count("missing"),
            "mean_gain": round(sum(gains) / len(gains), 10) if gains else None}


def build_sweep_report(out_dir: str | Path) -> dict:
    """Read a sweep folder's results and plan; write sweep_report.json, sweep_report.md and plots/.

    Models come in plan order, then any result not in the plan by model_key. Deterministic: the same
    inputs give the same JSON, so the report can be rebuilt while the sweep is still running."""
    out_dir = Path(out_dir)
    plan = _read_plan(out_dir)
    results = _read_results(out_dir)
    names = dict(plan)
    keys = [k for k, _ in plan] + sorted(k for k in results if k not in names)
    models = {k: _model_entry(names.get(k, k), results.get(k)) for k in keys}
    raw = {k: results[k] for k in keys if results.get(k) is not None}
    report = {"models": models, "summary": _summary(models), "plots": write_plots(models, raw, out_dir)}
    write_json(report, out_dir / REPORT_JSON)
    atomic_write(out_dir / REPORT_MD, lambda f: f.write(render_sweep_markdown(report)))
    return report


# -------------------------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    """One line of text that cannot break a markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _acc(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _points(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _fraction_pct(x: float | None) -> str:
    """Percent with one decimal, or two significant digits below 1% (fractions are often tiny)."""
    if x is None:
        return "n/a"
    v = 100 * x
    return "0" if v == 0 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.2g}"


def _g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _min_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def _deltas(general: dict) -> str:
    """'task: +0.5 ± 1.2; ...' in accuracy points; '-' when the model has no general-suite tasks."""
    parts = []
    for task, d in general.items():
        se = "" if d.get("stderr") is None else f" ± {100 * d['stderr']:.1f}"
        parts.append(f"{task}: {_points(d.get('delta'))}{se}")
    return _cell("; ".join(parts)) if parts else "-"


def _row(m: dict) -> str:
    name = _cell(m["model"])
    if m["status"] != "finished":
        return f"| {name} | {_cell(m['status'])} | - | - | - | - | - | - | {_min_s(m['wall_seconds'])} |"
    return (f"| {name} | {_acc(m['base_test_accuracy'])} | {_acc(m['cca_test_accuracy'])} | "
            f"{_points(m['gain'])} | {_fraction_pct(m['components_fraction'])} | {_g(m['best_lambda'])} | "
            f"{_g(m['best_lr'])} | {_deltas(m['general_deltas'])} | {_min_s(m['wall_seconds'])} |")


def render_sweep_markdown(report: dict) -> str:
    """The sweep on one page: a row per model (failed and missing ones by status), a summary, plots."""
    s = report["summary"]
    lines = ["# CCA sweep report", "",
             "| model | base test acc | CCA test acc | gain (points) | components (%) | best lambda | "
             "best lr | general-suite deltas (points ± stderr) | wall time (min:s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(m) for m in report["models"].values()]
    mean = "n/a" if s["mean_gain"] is None else f"{_points(s['mean_gain'])} points"
    lines += ["", f"**Summary:** {s['models']} models: {s['finished']} finished, {s['failed']} failed, "
              f"{s['missing']} missing; mean gain over finished models {mean}."]
    errors = [(m["model"], m["error"]) for m in report["models"].values()
              if m["status"] != "finished" and m.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {_cell(name)}: {_cell(err)[:300]}" for name, err in errors]
    if report["plots"]:
        lines += ["", "## Plots", ""]
        lines += [f"- [{Path(p).stem.replace('_', ' ')}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def use_log_x(values: list[float]) -> bool:
    """Log scale when all values are positive and span more than 10x."""
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def plot_gain_vs_components(models: dict[str, dict], path: Path) -> None:
    """Gain in accuracy points against the fraction of components selected, one labelled point each."""
    pts = [(100 * m["components_fraction"], 100 * m["gain"], m["model"]) for m in models.values()
           if m["status"] == "finished" and m["gain"] is not None and m["components_fraction"] is not None]
    fig = figure()
    ax = fig.subplots()
    if pts:
        xs = [x for x, _, _ in pts]
        ax.scatter(xs, [y for _, y, _ in pts], color="tab:blue", zorder=3)
        for x, y, label in pts:
            ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
        if use_log_x(xs):
            log_axis(ax, "x", xs, at_values=False)
    else:
        ax.text(0.5, 0.5, "no finished model with both accuracies and a components fraction",
                ha="center", va="center", transform=ax.transAxes)
    ax.margins(x=0.12, y=0.12)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("components selected (% of all)")
    ax.set_ylabel("gain, CCA - base test accuracy (points)")
    ax.set_title("CCA gain vs components updated")
    ax.grid(True, alpha=0.3)
    save_png(fig, path)


def _trial_points(trials: Any) -> tuple[list[tuple[float, float, float]], list[tuple[float, float]]]:
    """(lambda, lr, val accuracy) of trials with a result, (lambda, lr) of those without; log-plottable
    only (lambda and lr > 0)."""
    scored, unscored = [], []
    for t in trials if isinstance(trials, list) else []:
        t = _dict(t)
        lam, lr, val = _num(t.get("lambda")), _num(t.get("lr")), _num(t.get("val_accuracy"))
        if lam is None or lr is None or lam <= 0 or lr <= 0:
            continue
        if val is None:
            unscored.append((lam, lr))
        else:
            scored.append((lam, lr, val))
    return scored, unscored


def plot_landscape(name: str, trials: Any, path: Path) -> bool:
    """The trials in the lambda-lr plane (log-log), coloured by val accuracy, best trial starred.

    Returns False (and writes nothing) when no trial has a positive lambda, lr and a val accuracy."""
    scored, unscored = _trial_points(trials)
    if not scored:
        return False
    fig = figure(6.5, 4.5)
    ax = fig.subplots()
    sc = ax.scatter([p[0] for p in scored], [p[1] for p in scored], c=[100 * p[2] for p in scored],
                    cmap="viridis", s=60, edgecolors="k", linewidths=0.5, zorder=3)
    fig.colorbar(sc, ax=ax, label="val accuracy (%)")
    if unscored:
        ax.scatter([p[0] for p in unscored], [p[1] for p in unscored], marker="x", color="grey", zorder=2,
                   label="no val result")
    best = max(scored, key=lambda p: p[2])
    ax.scatter([best[0]], [best[1]], marker="*", s=320, facecolors="none", edgecolors="red",
               linewidths=1.5, zorder=4, label=f"best: lambda {best[0]:.3g}, lr {best[1]:.3g}, "
                                               f"val {100 * best[2]:.1f}%")
    log_axis(ax, "x", [p[0] for p in scored + unscored], at_values=True)
    log_axis(ax, "y", [p[1] for p in scored + unscored], at_values=True)
    ax.set_xlabel("lambda (mask sparsity)")
    ax.set_ylabel("lr")
    ax.set_title(f"{name}: search landscape ({len(scored) + len(unscored)} trials)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.2)
    save_png(fig, path)
    return True


def plot_regression_deltas(models: dict[str, dict], path: Path) -> None:
    """Grouped bars: per finished model, each general-suite task's delta (points) with stderr bars."""
    rows = [(m["model"], m["general_deltas"]) for m in models.values()
            if m["status"] == "finished" and m["general_deltas"]]
    tasks = sorted({t for _, g in rows for t, d in g.items() if d.get("delta") is not None})
    fig = figure(max(6.0, 2 + len(rows) * (0.6 + 0.3 * len(tasks))), 4.5)
    ax = fig.subplots()
    if not tasks:
        ax.text(0.5, 0.5, "no general-suite tasks in any finished model", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        width = 0.8 / len(tasks)
        for j, task in enumerate(tasks):
            xs, ys, errs = [], [], []
            for i, (_, g) in enumerate(rows):
                d = g.get(task)
                if d is None or d.get("delta") is None:
                    continue
                xs.append(i - 0.4 + (j + 0.5) * width)
                ys.append(100 * d["delta"])
                errs.append(0.0 if d.get("stderr") is None else 100 * d["stderr"])
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=task)
        ax.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=20, ha="right")
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("delta after CCA (points, ± stderr)")
    ax.set_title("General-suite regressions")
    ax.grid(True, axis="y", alpha=0.3)
    save_png(fig, path)


def write_plots(models: dict[str, dict], results: dict[str, dict], out_dir: str | Path) -> list[str]:
    """Write every plot under out_dir/plots; return their paths relative to out_dir, in a fixed order.

    Models without numbers (or without trials, for the landscapes) are left out of the plots."""
    out_dir = Path(out_dir)
    plot_gain_vs_components(models, out_dir / GAIN_PLOT)
    paths = [GAIN_PLOT]
    for key, m in models.items():
        rel = f"{PLOTS_DIR}/landscape_{_safe_name(key)}.png"
        if key in results and plot_landscape(m["model"], results[key].get("trials"), out_dir / rel):
            paths.append(rel)
    plot_regression_deltas(models, out_dir / DELTAS_PLOT)
    return paths + [DELTAS_PLOT]
