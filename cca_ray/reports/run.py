"""report.json (machine-readable, fractions in [0, 1]) and report.md (the same numbers for people)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cca_ray.config import BUILTIN, CCAConfig
from cca_ray.data.answers import macro_accuracy
from cca_ray.data.gsm_symbolic import Problem
from cca_ray.evaluate import accuracy_report, mcnemar_p
from cca_ray.io import atomic_write, write_json

if TYPE_CHECKING:
    from cca_ray.pipeline.evaluate import ArmResult
    from cca_ray.pipeline.run import Prepared


def _ordered(test: list[Problem], correct: dict[tuple, bool]) -> list[bool]:
    return [correct[p.key] for p in test]


def _mcnemar(test: list[Problem], a: dict[tuple, bool], b: dict[tuple, bool]) -> float:
    """Exact McNemar p of two models' per-problem test correctness."""
    return mcnemar_p(_ordered(test, a), _ordered(test, b))


def val_curves(runs: list[dict]) -> dict[str, list[list]]:
    """lr -> [[step, val_accuracy], ...] of each run, read from its stored history."""
    from cca_ray.pipeline.updates import validations

    return {f"{r['lr']:g}": [list(v) for v in validations(r)] for r in sorted(runs, key=lambda r: r["lr"])}


def _best_updated(arm: ArmResult, test: list[Problem], base_test: dict, n_params: int) -> dict:
    """report.json's best_updated entry of one arm: the best validated step >= 1 on test."""
    r, acc = arm.updated, accuracy_report(test, arm.updated_test)["accuracy"]
    return {"step": r["best_updated_step"], "lr": r["lr"], "val_accuracy": r["best_updated_val"],
            "test_accuracy": acc, "delta_vs_base": acc - accuracy_report(test, base_test)["accuracy"],
            "p_value_vs_base": _mcnemar(test, arm.updated_test, base_test),
            "params_changed": r["trainable_parameters"],
            "params_changed_fraction": r["trainable_parameters"] / n_params}


def _pivot_entry(arm: ArmResult) -> dict:
    """Pivot diagnostics of an arm's chosen step and of its best updated step."""
    b, u = arm.best, arm.updated
    return {"lr": b["lr"], "step": b["best_step"], **b["pivots"]["best"],
            "best_updated": {"lr": u["lr"], "step": u["best_updated_step"], **u["pivots"]["best_updated"]}}


def pivots_report(c: CCAConfig, prep: Prepared, cca: ArmResult, randoms: list[ArmResult]) -> dict:
    """report.json's pivots: split sizes, and the logit-difference statistics of the base, CCA and each
    random seed on the train and the held-out pivots."""
    return {"train": len(prep.pivots), "held_out": len(prep.heldout),
            "heldout_fraction": c.localize.heldout_fraction, "seed": c.localize.heldout_seed,
            "base": cca.best["pivots"]["base"], "cca": _pivot_entry(cca),
            "random": [{"seed": s} | _pivot_entry(a) for s, a in enumerate(randoms)]}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def build_report(c: CCAConfig, model_path: str, n_params: int, prep: Prepared, dcm_meta: dict, space,
                 cca: ArmResult, randoms: list[ArmResult], general: dict, timings: dict,
                 exported: dict) -> dict:
    """report.json: every number of the run, fractions in [0, 1]."""
    splits, correct, kept, loc_meta = prep.splits, prep.correct, prep.kept, prep.loc_meta
    template_acc = prep.template_acc
    test, base_test, best_cca = splits.test, prep.correct["test"], cca.best
    base_rep = accuracy_report(test, base_test)
    cca_rep = accuracy_report(test, cca.test)
    rand_reps = [accuracy_report(test, a.test) for a in randoms]
    base_v = [correct["val"][p.key] for p in splits.val]
    selected = dcm_meta["components_selected"]
    changed = best_cca["trainable_parameters"] if best_cca["best_step"] > 0 else 0
    p_rand = [_mcnemar(test, cca.test, a.test) for a in randoms]
    rand_updated = [_best_updated(a, test, base_test, n_params) for a in randoms]
    cca_updated = _best_updated(cca, test, base_test, n_params)
    p_rand_updated = [_mcnemar(test, cca.updated_test, a.updated_test) for a in randoms]
    cca_updated |= {"p_value_vs_random": max(p_rand_updated) if p_rand_updated else None,
                    "p_values_vs_each_random_seed": p_rand_updated}
    return {
        "model": model_path if c.model.name != BUILTIN else f"builtin ({model_path})",
        "config": c.model_dump(by_alias=True),
        "data": {"train": len(splits.train), "val": len(splits.val), "test": len(test),
                 "templates_kept": [str(k) for k in kept], "template_threshold": c.data.template_threshold,
                 "template_min_accuracy": c.data.template_min_accuracy,
                 "template_filter_measured_on": "train+val only (test untouched)",
                 "template_trainval_accuracy": {str(k): v for k, v in template_acc.items()}},
        "base": {"val_accuracy": macro_accuracy(list(zip([p.id for p in splits.val], base_v, strict=True))),
                 "test_accuracy": base_rep["accuracy"], "per_template_test": base_rep["per_template"]},
        "cca": {"val_accuracy": best_cca["best_val"], "test_accuracy": cca_rep["accuracy"],
                "lambda": c.dcm.lambda_, "lr": best_cca["lr"], "best_step": best_cca["best_step"],
                "kinds_updated": list(c.update.kinds), "optimizer": c.update.optimizer,
                "components_selected": selected, "components_total": space.total,
                "components_fraction": selected / space.total,
                "selected_per_kind": dcm_meta["selected_per_kind"],
                "params_changed": changed, "params_changed_fraction": changed / n_params,
                "p_value_vs_base": _mcnemar(test, cca.test, base_test),
                "p_value_vs_random": max(p_rand) if p_rand else None,
                "p_values_vs_each_random_seed": p_rand,
                "delta_vs_base": cca_rep["accuracy"] - base_rep["accuracy"],
                "lr_search": [{"lr": r["lr"], "best_val": r["best_val"], "best_step": r["best_step"],
                               "best_updated_val": r["best_updated_val"],
                               "best_updated_step": r["best_updated_step"]} for r in cca.runs],
                "best_updated": cca_updated, "val_curves": val_curves(cca.runs),
                "per_template_test": cca_rep["per_template"]},
        "random_control": {"test_accuracy": _mean([r["accuracy"] for r in rand_reps]),
                           "best_updated": {key: _mean([u[key] for u in rand_updated])
                                            for key in ("val_accuracy", "test_accuracy")},
                           "seeds": [{"seed": s, "test_accuracy": rep["accuracy"],
                                      "val_accuracy": a.best["best_val"],
                                      "lr": a.best["lr"], "best_step": a.best["best_step"],
                                      "best_updated": u, "val_curves": val_curves(a.runs)}
                                     for s, (rep, a, u) in enumerate(zip(rand_reps, randoms, rand_updated,
                                                                         strict=True))]},
        "pivots": pivots_report(c, prep, cca, randoms),
        "localization": {"method": loc_meta["method"], "examples": loc_meta["examples"],
                         "dropped": loc_meta["dropped"],
                         "generated_tokens": loc_meta.get("generated_tokens"),
                         "pivot_kinds": loc_meta.get("pivot_kinds")},
        "general": general,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "exports": exported,
    }


# ---- report.md


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
