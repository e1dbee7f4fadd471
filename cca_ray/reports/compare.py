"""comparison.json, comparison.md and plots/ of `cca-ray compare`: every method (CCA and its
baselines) against the same base model on the same test split, with a confidence interval over
templates for each gain, the fractions of components and parameters changed, the general-suite
deltas with standard errors and each method's wall time. Every number comes from the run."""

from __future__ import annotations

import math
from pathlib import Path

from cca_ray.io import atomic_write, write_json
from cca_ray.methods import CCA, FULL_FT, LORA, METHODS, RANDOM
from cca_ray.reports.plots import figure, log_axis, save_png


def label(name: str) -> str:
    """A method's name for people (methods.py's label; an unknown name as it is)."""
    return METHODS[name].label if name in METHODS else name



def template_ci(method: dict[str, float], base: dict[str, float], level: float = 0.95) -> dict:
    """Gain in macro accuracy (the mean over templates of method - base accuracy) with a t interval
    over templates: templates are the unit GSM-Symbolic varies, so the interval says how much the
    gain depends on which templates were drawn."""
    from scipy.stats import t

    diffs = [method[k] - base[k] for k in base]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"gain": mean, "ci": [None, None], "templates": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"gain": mean, "ci": [mean - half, mean + half], "templates": n}


def build_comparison(model: str, base: dict, methods: dict[str, dict], info: dict) -> dict:
    """comparison.json's content from the base evaluation and each method's evaluation result."""
    total = base["parameters"]
    out: dict[str, dict] = {}
    for name, m in methods.items():
        ci = template_ci(m["per_template_test"], base["test"]["per_template"])
        out[name] = {
            "test_accuracy": m["test_accuracy"], "gain": ci["gain"], "gain_ci95": ci["ci"],
            "val_accuracy": m["val_accuracy"], "lr": m["lr"], "best_step": m["best_step"],
            "components_fraction": m["components_fraction"],
            "params_changed_fraction": m["trainable_parameters"] / total,
            "entries_changed_fraction": m["entries_changed"] / total,
            "trainable_parameters": m["trainable_parameters"], "entries_changed": m["entries_changed"],
            "general_deltas": m["general_deltas"], "wall_seconds": m["wall_seconds"],
            "tune_seconds": m["tune_seconds"], "eval_seconds": m["eval_seconds"],
            "trials": len(m["trials"]), "trial_results": m["trials"],
            "seed_test_accuracies": m.get("seed_test_accuracies"),
        }
    checks = {}
    if CCA in out:
        cca = out[CCA]
        if RANDOM in out:
            checks["cca_gain_above_random"] = cca["gain"] > out[RANDOM]["gain"]
            lo, hi = cca["gain_ci95"]  # a larger gain inside CCA's own interval is not beyond noise
            checks["random_gain_inside_cca_ci"] = bool(lo <= out[RANDOM]["gain"] <= hi)
        for other in (LORA, FULL_FT):
            if other in out:
                ratio = (out[other]["params_changed_fraction"] / cca["params_changed_fraction"]
                         if cca["params_changed_fraction"] else None)
                checks[f"{other}_over_cca_params_changed"] = ratio
    return {"model": model, "parameters": total,
            "base": {"test_accuracy": base["test"]["accuracy"], "val_accuracy": base["val_accuracy"],
                     "test_problems": base["test_problems"], "templates": len(base["test"]["per_template"]),
                     "general": base["general"]},
            "methods": out, "checks": checks, **info}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _frac(x: float) -> str:
    return f"{100 * x:.3g}%"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


def _general_cell(g: dict) -> str:
    parts = []
    for task, d in g.items():
        se = "" if d["stderr"] is None else f" ± {100 * d['stderr']:.1f}"
        parts.append(f"{task} {100 * d['delta']:+.1f}{se}")
    return "; ".join(parts) or "n/a"


def render_markdown(r: dict) -> str:
    """The table the paper shows, one row per method, then what the checks say."""
    b = r["base"]
    lines = [f"# CCA vs baselines: {r['model']}", "",
             f"Base model: GSym test {_pct(b['test_accuracy'])} ({b['test_problems']} problems, "
             f"{b['templates']} templates), val {_pct(b['val_accuracy'])}; {r['parameters']:,} parameters. "
             f"Each method's lr was searched with {r['trials_per_method']} Tune trials; the best by val "
             "accuracy was tested once.", "",
             "| method | GSym test | gain (points) [95% CI over templates] | components changed | "
             "parameters trained | entries changed | general-suite deltas (points ± stderr) | lr | "
             "best step | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        lo, hi = m["gain_ci95"]
        ci = "" if lo is None else f" [{_pts(lo)}, {_pts(hi)}]"
        lines.append(f"| {label(name)} | {_pct(m['test_accuracy'])} | {_pts(m['gain'])}{ci} | "
                     f"{_frac(m['components_fraction'])} | {_frac(m['params_changed_fraction'])} | "
                     f"{_frac(m['entries_changed_fraction'])} | {_general_cell(m['general_deltas'])} | "
                     f"{m['lr']:.3g} | {m['best_step']} | {m['wall_seconds'] / 60:.1f} min |")
    lines += ["", "- *parameters trained*: what the method updates (CCA and random: the selected rows; "
              "LoRA: the adapters; full fine-tuning and no mask: everything), as a fraction of the "
              "model's parameters. *entries changed*: entries of the exported model that differ from "
              "the base (merged LoRA changes whole matrices; best step 0 changes nothing).",
              "- *gain*: macro test accuracy minus the base's; the interval is a t interval over the "
              "per-template differences.",
              "- *wall time*: the method's Tune search plus its test and general evaluation."]
    if r["methods"].get(RANDOM, {}).get("seed_test_accuracies"):
        seeds = ", ".join(_pct(x) for x in r["methods"][RANDOM]["seed_test_accuracies"])
        lines.append(f"- random components: test accuracy is the mean over seeds ({seeds}), each with as "
                     "many components of each kind as CCA's mask at the tuned lr; its general-suite "
                     "deltas are seed 0's.")
    c = r["checks"]
    if c:
        lines += ["", "## Checks", ""]
        if "cca_gain_above_random" in c:
            diff = 100 * (r["methods"][CCA]["gain"] - r["methods"][RANDOM]["gain"])
            inside = c.get("random_gain_inside_cca_ci")
            lines.append(f"- CCA's test gain above the random-component control: "
                         f"**{'yes' if c['cca_gain_above_random'] else 'no'}** (CCA - random = {diff:+.2f} "
                         f"points; the random control's gain lies {'inside' if inside else 'outside'} "
                         f"CCA's 95% interval over templates"
                         f"{', so the difference is not beyond noise' if inside else ''}).")
        for other, need in ((LORA, 10), (FULL_FT, 100)):
            ratio = c.get(f"{other}_over_cca_params_changed")
            if f"{other}_over_cca_params_changed" in c:
                verdict = "n/a (CCA trains nothing)" if ratio is None else (
                    f"{ratio:,.0f}x ({'at least' if ratio >= need else 'less than'} {need}x)")
                lines.append(f"- {label(other)} trains {verdict} as many parameters as CCA.")
    lines += ["", "Plots: `plots/gain_vs_params_changed.png`, `plots/general_deltas.png`."]
    return "\n".join(lines) + "\n"


def plot_gain_vs_params(r: dict, path: Path) -> None:
    """Gain (with its template CI) against the fraction of parameters trained, log x."""
    fig = figure()
    ax = fig.add_subplot(1, 1, 1)
    xs = []
    for name, m in r["methods"].items():
        x = max(m["params_changed_fraction"], 1e-9)
        xs.append(x)
        lo, hi = m["gain_ci95"]
        err = None if lo is None else [[100 * (m["gain"] - lo)], [100 * (hi - m["gain"])]]
        ax.errorbar([x], [100 * m["gain"]], yerr=err, fmt="o", capsize=4, label=label(name))
    ax.axhline(0, color="grey", lw=0.8)
    log_axis(ax, "x", xs, at_values=False)
    ax.set_xlabel("fraction of parameters trained (log scale)")
    ax.set_ylabel("GSym test gain over base (points)")
    ax.set_title(f"{r['model']}: gain vs parameters changed")
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_general_deltas(r: dict, path: Path) -> None:
    """General-suite deltas per method and task, with standard-error bars."""
    methods = list(r["methods"])
    tasks = sorted({t for m in r["methods"].values() for t in m["general_deltas"]})
    fig = figure(max(6.0, 1.4 * len(methods)), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(tasks))
    for j, task in enumerate(tasks):
        ys, errs = [], []
        for name in methods:
            d = r["methods"][name]["general_deltas"].get(task)
            ys.append(100 * d["delta"] if d else 0.0)
            errs.append(100 * d["stderr"] if d and d["stderr"] is not None else 0.0)
        ax.bar([i + (j - (len(tasks) - 1) / 2) * width for i in range(len(methods))], ys, width, yerr=errs,
               capsize=3, label=task)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([label(m) for m in methods], rotation=15, fontsize=8)
    ax.set_ylabel("delta after - before (points)")
    ax.set_title("general-suite regression per method")
    if tasks:
        ax.legend(fontsize=8)
    save_png(fig, path)


def write_comparison(r: dict, out: str | Path) -> None:
    out = Path(out)
    write_json(r, out / "comparison.json")
    atomic_write(out / "comparison.md", lambda f: f.write(render_markdown(r)))
    plot_gain_vs_params(r, out / "plots" / "gain_vs_params_changed.png")
    plot_general_deltas(r, out / "plots" / "general_deltas.png")
