"""What a person reads: a pruning result turned into a circuit (named nodes, edges, picture,
snippets), and circuits.json / report.md over every circuit of the run."""

from __future__ import annotations

import json
from pathlib import Path

from cca_ray.circuits.artifacts import Artifacts
from cca_ray.circuits.config import CircuitsConfig
from cca_ray.circuits.graph import geometric_mean
from cca_ray.io import write_json, write_text


def finalize(a: Artifacts, variant: str, task: str, result: dict, trials: list[dict] | None,
             dest: Path) -> dict:
    """Turn a pruning result into the circuit: named nodes, edges, picture and snippets, written
    into ``dest`` (circuit.json, circuit.png and snippets.md when the target loss was reached)."""
    from cca_ray.circuits.graph import (
        circuit_edges,
        circuit_nodes,
        edge_counts,
        render,
        snippets_markdown,
        top_snippets,
    )

    c = a.c
    model, means = a.load(variant)
    keep = result.get("keep") or {}
    circuit = {k: v for k, v in result.items() if k not in ("keep", "tau")}
    circuit["nodes"] = circuit_nodes(keep, means, result.get("tau"))
    circuit["edges"] = circuit_edges(model, keep)
    weights, residual = edge_counts(circuit["edges"])
    circuit["n_edges"] = weights if result.get("reached") else None  # as the paper counts: no residual links
    circuit["n_residual_links"] = residual if result.get("reached") else None
    circuit["edge_kinds"] = {k: sum(e["kind"] == k for e in circuit["edges"])
                             for k in sorted({e["kind"] for e in circuit["edges"]})}
    meta = a.model_meta(variant) or {}
    circuit["model"] = {"variant": variant, "l0_target": c.variant(variant).l0_target,
                        "val_loss": meta.get("val_loss"), "nonzero_fraction": meta.get("nonzero_fraction")}
    if trials is not None:
        circuit["trials"] = trials
    if result.get("reached"):
        tok, train_tokens, _ = a.data()
        r = c.report
        snippets = top_snippets(model, tok, train_tokens, keep, r.snippet_windows, r.snippets_per_node,
                                r.snippet_tokens)
        title = (f"{task} in {variant}: {circuit['n_nodes']} nodes, {circuit['n_edges']} edges, "
                 f"loss {circuit['task_loss']:.3f}")
        render(circuit, dest / "circuit.png", title)
        write_text(f"# Top-activating snippets: {task} in {variant}\n\n" + snippets_markdown(snippets),
                   dest / "snippets.md")
        circuit["snippets"] = snippets
    write_json(circuit, dest / "circuit.json")
    return circuit


SUMMARY_FIELDS = ("nodes", "edges", "residual_links", "task_loss", "sufficient", "necessary",
                  "necessity_loss", "full_model_loss", "reached", "total_nodes", "scale", "shift")


def summarize(a: Artifacts) -> dict:
    """circuits.json and report.md from the config's trained models and every circuit in
    OUT/circuits/."""
    c, out = a.c, a.out
    summary: dict = {"models": {}, "dense_over_sparse": {}}
    for v in c.variants:
        meta = a.model_meta(v.name)
        if meta is not None:
            summary["models"][v.name] = {"l0_target": v.l0_target, "val_loss": meta.get("val_loss"),
                                         "nonzero_fraction": meta.get("nonzero_fraction"),
                                         "train_seconds": (meta.get("history") or [{}])[-1].get("seconds")}
        per_task = {}
        for task in c.tasks:
            path = a.circuit_dir(v.name, task) / "circuit.json"
            if path.is_file():
                ci = json.loads(path.read_text())
                row = {"nodes": ci.get("n_nodes"), "edges": ci.get("n_edges"),
                       "residual_links": ci.get("n_residual_links")}
                row.update({k: ci.get(k) for k in SUMMARY_FIELDS if k not in row})
                per_task[task] = row
        summary[v.name] = per_task
    names = [v.name for v in c.variants]
    if "sparse" in names and "dense" in names:
        for task in c.tasks:
            s, d = summary["sparse"].get(task, {}), summary["dense"].get(task, {})
            summary["dense_over_sparse"][task] = {
                k: (d[k] / s[k] if s.get(k) and d.get(k) is not None else None) for k in ("nodes", "edges")}
        ratios = summary["dense_over_sparse"].values()
        summary["dense_over_sparse_geomean"] = {k: geometric_mean([r[k] for r in ratios])
                                                for k in ("nodes", "edges")}
    stored = a.stored_bridges()
    if stored is not None:
        summary["bridges"] = {"dense": stored["dense"], "sparse": stored["sparse"], "final": stored["final"],
                              "task_loss": stored["task_loss"]}
    write_json(summary, out / "circuits.json")
    write_text(report_markdown(c, summary), out / "report.md")
    return summary


def report_markdown(c: CircuitsConfig, summary: dict) -> str:
    """The circuit sizes per model and task at the target loss, and the dense/sparse ratios."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)

    lines = [f"# Circuits at target task loss {c.prune.target_loss}", "",
             "| model | L0 | val LM loss | task | nodes | edges (+ residual links) | task loss | sufficient "
             "| necessary (loss with circuit ablated) |", "|---|---|---|---|---|---|---|---|---|"]
    for v in c.variants:
        m = summary["models"].get(v.name, {})
        for task in c.tasks:
            r = summary.get(v.name, {}).get(task)
            if r is None:
                continue
            links = "" if r.get("residual_links") is None else f" (+{r['residual_links']})"
            lines.append(f"| {v.name} | {v.l0_target:g} | {fmt(m.get('val_loss'))} | {task} | "
                         f"{fmt(r['nodes']) if r['reached'] else 'not reached'} | {fmt(r['edges'])}{links} | "
                         f"{fmt(r['task_loss'])} | {fmt(r.get('sufficient'))} | "
                         f"{fmt(r.get('necessary'))} ({fmt(r.get('necessity_loss'))}) |")
    if summary["dense_over_sparse"]:
        lines += ["", "| task | dense/sparse nodes | dense/sparse edges |", "|---|---|---|"]
        for task, r in summary["dense_over_sparse"].items():
            lines.append(f"| {task} | {fmt(r['nodes'], '.2f')} | {fmt(r['edges'], '.2f')} |")
        g = summary.get("dense_over_sparse_geomean", {})
        lines.append(f"| geometric mean | {fmt(g.get('nodes'), '.2f')} | {fmt(g.get('edges'), '.2f')} |")
    if summary.get("bridges"):
        b = summary["bridges"]
        lines += ["", f"Bridges {b['dense']} <-> {b['sparse']}: task loss on held-out pairs when the forward "
                  f"pass crosses at one sublayer (worst site shown; per site in circuits.json)", "",
                  f"| task | {b['dense']} | {b['sparse']} | {b['dense']} -> encode -> {b['sparse']} | "
                  f"{b['sparse']} -> decode -> {b['dense']} |", "|---|---|---|---|---|"]
        for task, r in b["task_loss"].items():
            worst = {k: max(range(len(r[k])), key=r[k].__getitem__) for k in ("encoded", "decoded")}
            crossed = [f"{fmt(r[k][worst[k]])} (site {worst[k]})" for k in ("encoded", "decoded")]
            lines.append(f"| {task} | {fmt(r['dense'])} | {fmt(r['sparse'])} | {' | '.join(crossed)} |")
    return "\n".join(lines) + "\n"
