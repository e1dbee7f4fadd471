"""report.json (machine-readable, fractions in [0, 1]) and report.md (the same numbers for people)."""

from __future__ import annotations

from pathlib import Path

from cca_ray.io import _atomic_write, write_json


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def render_markdown(r: dict) -> str:
    """A one-page summary: headline table, controls, general suite, localisation, timings."""
    cca, base, rnd = r["cca"], r["base"], r["random_control"]
    lines = [
        f"# CCA report: {r['model']}", "",
        "| | val | test |", "|---|---|---|",
        f"| base | {_pct(base['val_accuracy'])} | {_pct(base['test_accuracy'])} |",
        f"| CCA (lambda {cca['lambda']}, lr {cca['lr']:g}, step {cca['best_step']}) | "
        f"{_pct(cca['val_accuracy'])} | {_pct(cca['test_accuracy'])} |",
        f"| random components (mean of {len(rnd['seeds'])} seeds) | | {_pct(rnd['test_accuracy'])} |", "",
        f"- CCA vs base: {100 * cca['delta_vs_base']:+.1f} points on {r['data']['test']} test problems, "
        f"McNemar p = {_p(cca['p_value_vs_base'])}; vs random control p = {_p(cca['p_value_vs_random'])} "
        "(largest over seeds).",
        f"- Components selected: {cca['components_selected']} of {cca['components_total']} "
        f"({_pct(cca['components_fraction'])}) {cca['selected_per_kind']}; updated kinds "
        f"{cca['kinds_updated']}; parameters changed {_pct(cca['params_changed_fraction'])}.",
        f"- Template filter on train+val only: {len(r['data']['templates_kept'])} templates kept "
        f"(accuracy < {r['data']['template_threshold']}).", "",
        "## Random-component control", "", "| seed | lr | best step | val | test |", "|---|---|---|---|---|",
    ]
    lines += [f"| {s['seed']} | {s['lr']:g} | {s['best_step']} | {_pct(s['val_accuracy'])} | "
              f"{_pct(s['test_accuracy'])} |" for s in rnd["seeds"]]
    lines += ["", "## CCA lr search (best step by val accuracy, step 0 = base included)", "",
              "| lr | best val | best step |", "|---|---|---|"]
    lines += [f"| {x['lr']:g} | {_pct(x['best_val'])} | {x['best_step']} |" for x in cca["lr_search"]]
    lines += ["", "## General suite (lm-eval)", "", "| task | before | after | delta | stderr |",
              "|---|---|---|---|---|"]
    for task, g in r["general"].items():
        se = "n/a" if g["stderr"] is None else f"{100 * g['stderr']:.1f}"
        lines.append(f"| {task} | {_pct(g['before'])} | {_pct(g['after'])} | "
                     f"{100 * g['delta']:+.1f} | {se} |")
    loc = r["localization"]
    lines += ["", f"## Localisation: {loc['method']}, {loc['examples']} examples, "
              f"dropped {loc['dropped']}", "",
              "## Timings (seconds)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["timings"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    write_json(report, out / "report.json")
    _atomic_write(out / "report.md", lambda f: f.write(render_markdown(report)))
