"""report.json (machine-readable, fractions in [0, 1]) and report.md (the same numbers for people)."""

from __future__ import annotations

from pathlib import Path

from cca_ray.io import atomic_write, write_json


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2g}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _pivot_cells(d: dict) -> str:
    """Mean logit difference, desired-wins share and flip rate of one pivot set."""
    return f"{_num(d['mean_logit_diff'])} | {_pct(d['desired_wins'])} | {_pct(d['flip_rate'])}"


def _pivot_rows(name: str, e: dict) -> list[str]:
    u = e["best_updated"]
    return [f"| {name} (lr {e['lr']:g}, step {e['step']}) | {_pivot_cells(e['train'])} | "
            f"{_pivot_cells(e['held_out'])} |",
            f"| {name} best updated (lr {u['lr']:g}, step {u['step']}) | {_pivot_cells(u['train'])} | "
            f"{_pivot_cells(u['held_out'])} |"]


def render_pivots(p: dict) -> list[str]:
    """The pivot diagnostics table: train pivots flipped but held-out ones not = no transfer; train
    pivots not flipped = the update is too weak."""
    lines = [f"## Pivots: {p['train']} train, {p['held_out']} held out (never trained on)", "",
             "logit[desired] - logit[undesired] at the pivot: mean, share where desired wins, and flip "
             "rate (of the pivots the base got wrong, the share now right).", "",
             "| model | train mean diff | train desired wins | train flip rate | held-out mean diff | "
             "held-out desired wins | held-out flip rate |", "|---|---|---|---|---|---|---|",
             f"| base | {_pivot_cells(p['base']['train'])} | {_pivot_cells(p['base']['held_out'])} |"]
    lines += _pivot_rows("CCA", p["cca"])
    for s in p["random"]:
        lines += _pivot_rows(f"random seed {s['seed']}", s)
    return lines + [""]


def render_markdown(r: dict) -> str:
    """A one-page summary: headline table, controls, pivot diagnostics, validation curves, general
    suite, localisation, timings."""
    cca, base, rnd = r["cca"], r["base"], r["random_control"]
    cu, ru = cca["best_updated"], rnd["best_updated"]
    lines = [
        f"# CCA report: {r['model']}", "",
        "| | val | test |", "|---|---|---|",
        f"| base | {_pct(base['val_accuracy'])} | {_pct(base['test_accuracy'])} |",
        f"| CCA (lambda {cca['lambda']}, lr {cca['lr']:g}, step {cca['best_step']}) | "
        f"{_pct(cca['val_accuracy'])} | {_pct(cca['test_accuracy'])} |",
        f"| CCA best updated step (lr {cu['lr']:g}, step {cu['step']}) | "
        f"{_pct(cu['val_accuracy'])} | {_pct(cu['test_accuracy'])} |",
        f"| random components (mean of {len(rnd['seeds'])} seeds) | | {_pct(rnd['test_accuracy'])} |",
        f"| random components best updated step (mean) | {_pct(ru['val_accuracy'])} | "
        f"{_pct(ru['test_accuracy'])} |", "",
        f"- CCA vs base: {100 * cca['delta_vs_base']:+.1f} points on {r['data']['test']} test problems, "
        f"McNemar p = {_p(cca['p_value_vs_base'])}; vs random control p = {_p(cca['p_value_vs_random'])} "
        "(largest over seeds).",
        f"- CCA best updated step (step >= 1, even where step 0 wins) vs base: "
        f"{100 * cu['delta_vs_base']:+.1f} points, p = {_p(cu['p_value_vs_base'])}; vs random "
        f"(best updated) p = {_p(cu['p_value_vs_random'])}.",
        f"- Components selected: {cca['components_selected']} of {cca['components_total']} "
        f"({_pct(cca['components_fraction'])}) {cca['selected_per_kind']}; updated kinds "
        f"{cca['kinds_updated']}; parameters changed {_pct(cca['params_changed_fraction'])}.",
        f"- Template filter on train+val only: {len(r['data']['templates_kept'])} templates kept "
        f"({r['data'].get('template_min_accuracy', 0.0)} <= accuracy < {r['data']['template_threshold']}).",
        "",
        "## Random-component control", "",
        "| seed | lr | best step | val | test | updated: lr | step | val | test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {s['seed']} | {s['lr']:g} | {s['best_step']} | {_pct(s['val_accuracy'])} | "
              f"{_pct(s['test_accuracy'])} | {s['best_updated']['lr']:g} | {s['best_updated']['step']} | "
              f"{_pct(s['best_updated']['val_accuracy'])} | {_pct(s['best_updated']['test_accuracy'])} |"
              for s in rnd["seeds"]]
    lines += ["", "## CCA lr search (best step by val accuracy, step 0 = base included; best updated: "
              "step >= 1)", "",
              "| lr | best val | best step | best updated val | best updated step |", "|---|---|---|---|---|"]
    lines += [f"| {x['lr']:g} | {_pct(x['best_val'])} | {x['best_step']} | {_pct(x['best_updated_val'])} | "
              f"{x['best_updated_step']} |" for x in cca["lr_search"]]
    lines += ["", *render_pivots(r["pivots"]), "## Validation curves (step: val accuracy)", ""]
    lines += _curve_lines("CCA", cca["val_curves"])
    for s in rnd["seeds"]:
        lines += _curve_lines(f"random seed {s['seed']}", s["val_curves"])
    lines += ["", "## General suite (lm-eval)", "", "| task | before | after | delta | stderr |",
              "|---|---|---|---|---|"]
    for task, g in r["general"].items():
        se = "n/a" if g["stderr"] is None else f"{100 * g['stderr']:.1f}"
        lines.append(f"| {task} | {_pct(g['before'])} | {_pct(g['after'])} | "
                     f"{100 * g['delta']:+.1f} | {se} |")
    loc = r["localization"]
    lines += ["", f"## Localisation: {loc['method']}, {loc['examples']} examples, "
              f"dropped {loc['dropped']}", "",
              f"Pivots by kind (operation sign against operation sign, digit against digit, other): "
              f"{loc.get('pivot_kinds')}", "",
              "## Timings (seconds)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["timings"].items()]
    return "\n".join(lines) + "\n"


def _curve_lines(name: str, curves: dict) -> list[str]:
    return [f"- {name}, lr {lr}: " + ", ".join(f"{step}: {_pct(v)}" for step, v in curve)
            for lr, curve in curves.items()]


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    write_json(report, out / "report.json")
    atomic_write(out / "report.md", lambda f: f.write(render_markdown(report)))
