"""The circuits loop end to end, one on-disk artifact per stage under OUT (so a rerun or a killed
job resumes): corpus + tokenizer -> sparse and dense models -> ablation means -> pruning (with or
without the Tune search) per (model, task) -> circuit JSON, picture, snippets -> circuits.json.

OUT/
  config.yaml                 the config of the run (a later run with other data/model/train refuses)
  data/tokenizer.json, data/tokens.safetensors (train, val)
  models/<variant>/           weights.safetensors, model.json (spec, loss history), means.safetensors
  circuits/<variant>/<task>/  circuit.json, circuit.png, snippets.md, trials/ (one JSON per Tune trial)
  circuits.json, report.md    every (model, task): nodes, edges, task_loss, sufficient, necessary; ratios
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from cca_ray.circuits.config import CircuitsConfig
from cca_ray.config import ConfigError
from cca_ray.io import write_json, write_safetensors, write_text

log = logging.getLogger(__name__)

_FROZEN = ("corpus", "model", "train", "variants")  # sections whose change invalidates OUT's models


def check_out(c: CircuitsConfig, out: Path) -> None:
    """Record the config in OUT; refuse to mix models made under another corpus/model/train config."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    now = c.model_dump(mode="json")
    if path.is_file():
        before = yaml.safe_load(path.read_text())
        changed = [k for k in _FROZEN if before.get(k) != now.get(k)]
        if changed:
            raise ConfigError(f"{out} holds models made with a different {', '.join(changed)} config; "
                              f"use another --out (or delete {out}) to train anew")
    write_text(yaml.safe_dump(now, sort_keys=False), path)


def prepare_data(c: CircuitsConfig, out: Path):
    """The tokenizer and the train/val token streams, built once and reused."""
    from cca_ray.circuits.corpus import generate_corpus
    from cca_ray.circuits.tokenizer import encode_docs, load_tokenizer, save_tokenizer, train_tokenizer

    data = out / "data"
    if (data / "tokens.safetensors").is_file():
        t = load_file(str(data / "tokens.safetensors"))
        return load_tokenizer(data / "tokenizer.json"), t["train"], t["val"]
    data.mkdir(parents=True, exist_ok=True)
    s = c.corpus
    start = time.perf_counter()
    docs = generate_corpus(s.train_docs + s.val_docs, s.seed)
    train_docs, val_docs = docs[:s.train_docs], docs[s.train_docs:]
    tok = train_tokenizer(train_docs, s.vocab_size)
    train, val = encode_docs(tok, train_docs), encode_docs(tok, val_docs)
    save_tokenizer(tok, data / "tokenizer.json")
    write_safetensors({"train": train, "val": val}, data / "tokens.safetensors")
    log.info("corpus: %d train docs (%d tokens), %d val docs (%d tokens), vocab %d, %.1f s",
             len(train_docs), len(train), len(val_docs), len(val), tok.get_vocab_size(),
             time.perf_counter() - start)
    return tok, train, val


def train_variant(c: CircuitsConfig, out: Path, name: str, progress: bool = True) -> Path:
    """Train one variant (sparse or dense) into OUT/models/<name> (resumes from its checkpoint)."""
    from cca_ray.circuits.train import train

    tok, train_tokens, val_tokens = prepare_data(c, out)
    v = c.variant(name)
    path = out / "models" / name
    train(c.model.spec(tok.get_vocab_size()), c.train.spec(v.l0_target), train_tokens, val_tokens,
          path, progress)
    return path


def train_all(c: CircuitsConfig, out: Path, names: list[str], progress: bool = True) -> None:
    """Train the variants: as concurrent Ray tasks when Ray is up, else one after another."""
    import ray

    prepare_data(c, out)  # once, before any worker needs it
    todo = [n for n in names if not _trained(out / "models" / n)]
    if len(todo) > 1 and ray.is_initialized():
        from cca_ray.tune import actor_options

        remote = ray.remote(_train_task).options(**actor_options(c.train_resources))
        log.info("training %s as %d concurrent Ray tasks", ", ".join(todo), len(todo))
        ray.get([remote.remote(c.model_dump(mode="json"), str(out), n) for n in todo])
    else:
        for n in todo:
            train_variant(c, out, n, progress)


def _train_task(config: dict, out: str, name: str) -> str:
    logging.basicConfig(level=logging.INFO)
    return str(train_variant(CircuitsConfig.model_validate(config), Path(out), name, progress=True))


def _trained(path: Path) -> bool:
    return (path / "model.json").is_file() and bool(json.loads((path / "model.json").read_text()).get("done"))


def load_variant(c: CircuitsConfig, out: Path, name: str):
    """(model, means) of a trained variant; the means over the corpus are computed once and stored."""
    from cca_ray.circuits.prune import node_means
    from cca_ray.circuits.train import load_model

    path = out / "models" / name
    if not _trained(path):
        raise FileNotFoundError(f"{path}: variant {name!r} is not trained; run `cca-ray circuits train "
                                f"--out {out}` first")
    model = load_model(path)
    if not (path / "means.safetensors").is_file():
        _, train_tokens, _ = prepare_data(c, out)
        means = node_means(model, train_tokens, c.prune.mean_windows, seed=c.prune.seed)
        write_safetensors(means, path / "means.safetensors")
    return model, load_file(str(path / "means.safetensors"))


def task_sets(c: CircuitsConfig, tok, task: str, n_ctx: int):
    """Train / val / test minimal pairs of a task (disjoint seeds, same for every model)."""
    from cca_ray.circuits.tasks import make_task

    p = c.prune
    return tuple(make_task(task, tok, n, p.seed * 1000 + i, n_ctx)
                 for i, n in enumerate((p.train_pairs, p.val_pairs, p.test_pairs)))


def prune_one(c: CircuitsConfig, out: Path, variant: str, task: str, params: dict | None = None,
              progress: bool = False) -> dict:
    """Prune one (model, task) with the config's hyperparameters, `params` overriding some."""
    from cca_ray.circuits.prune import prune

    tok, _, _ = prepare_data(c, out)
    model, means = load_variant(c, out, variant)
    train, val, test = task_sets(c, tok, task, model.spec.n_ctx)
    result = prune(model, means, train, val, test, c.prune.spec(**(params or {})), progress)
    return {"variant": variant, "task": task, **result}


def circuit_dir(out: Path, variant: str, task: str) -> Path:
    return out / "circuits" / variant / task


def finalize(c: CircuitsConfig, out: Path, variant: str, task: str, result: dict,
             trials: list[dict] | None = None) -> dict:
    """Turn a pruning result into the circuit: named nodes, edges, picture, snippets; written to disk."""
    from cca_ray.circuits.graph import circuit_edges, circuit_nodes, render, snippets_markdown, top_snippets

    d = circuit_dir(out, variant, task)
    d.mkdir(parents=True, exist_ok=True)
    write_json({"result": result, "trials": trials}, d / "result.json")  # what `report --redraw` redoes
    model, means = load_variant(c, out, variant)
    keep = result.get("keep") or {}
    circuit = {k: v for k, v in result.items() if k not in ("keep", "tau")}
    circuit["nodes"] = circuit_nodes(keep, means, result.get("tau"))
    circuit["edges"] = circuit_edges(model, keep)
    circuit["n_edges"] = len(circuit["edges"]) if result.get("reached") else None
    circuit["edge_kinds"] = {k: sum(e["kind"] == k for e in circuit["edges"])
                             for k in sorted({e["kind"] for e in circuit["edges"]})}
    meta = json.loads((out / "models" / variant / "model.json").read_text())
    circuit["model"] = {"variant": variant, "l0_target": c.variant(variant).l0_target,
                        "val_loss": meta.get("val_loss"), "nonzero_fraction": meta.get("nonzero_fraction")}
    if trials is not None:
        circuit["trials"] = trials
    if result.get("reached"):
        tok, train_tokens, _ = prepare_data(c, out)
        r = c.report
        snippets = top_snippets(model, tok, train_tokens, keep, r.snippet_windows, r.snippets_per_node,
                                r.snippet_tokens)
        title = (f"{task} in {variant}: {circuit['n_nodes']} nodes, {circuit['n_edges']} edges, "
                 f"loss {circuit['task_loss']:.3f}")
        render(circuit, d / "circuit.png", title)
        (d / "snippets.md").write_text(f"# Top-activating snippets: {task} in {variant}\n\n"
                                       + snippets_markdown(snippets))
        circuit["snippets"] = snippets
    write_json(circuit, d / "circuit.json")
    return circuit


def redraw(c: CircuitsConfig, out: Path) -> list[str]:
    """Rebuild every finished circuit's JSON, picture and snippets from its stored pruning result
    (e.g. after changing the `report` settings); nothing is pruned again."""
    done = []
    for v in c.variants:
        for task in c.tasks:
            d = circuit_dir(out, v.name, task)
            if (d / "result.json").is_file():
                stored = json.loads((d / "result.json").read_text())
            elif (d / "circuit.json").is_file():  # a searched circuit: its best trial holds the result
                circuit = json.loads((d / "circuit.json").read_text())
                best = (circuit.get("search") or {}).get("best_trial")
                if best is None or not (d / "trials" / f"{best}.json").is_file():
                    continue
                result = json.loads((d / "trials" / f"{best}.json").read_text())
                stored = {"result": {**result, "search": circuit["search"]}, "trials": circuit.get("trials")}
            else:
                continue
            finalize(c, out, v.name, task, stored["result"], stored["trials"])
            done.append(f"{v.name}/{task}")
    return done


SUMMARY_FIELDS = ("nodes", "edges", "task_loss", "sufficient", "necessary", "necessity_loss",
                  "full_model_loss", "reached", "total_nodes", "scale", "shift")


def summarize(c: CircuitsConfig, out: Path) -> dict:
    """circuits.json and report.md from every finished circuit under OUT."""
    summary: dict = {"models": {}, "dense_over_sparse": {}}
    for v in c.variants:
        meta_path = out / "models" / v.name / "model.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            summary["models"][v.name] = {"l0_target": v.l0_target, "val_loss": meta.get("val_loss"),
                                         "nonzero_fraction": meta.get("nonzero_fraction"),
                                         "train_seconds": (meta.get("history") or [{}])[-1].get("seconds")}
        per_task = {}
        for task in c.tasks:
            path = circuit_dir(out, v.name, task) / "circuit.json"
            if path.is_file():
                ci = json.loads(path.read_text())
                row = {"nodes": ci.get("n_nodes"), "edges": ci.get("n_edges")}
                row.update({k: ci.get(k) for k in SUMMARY_FIELDS if k not in ("nodes", "edges")})
                per_task[task] = row
        summary[v.name] = per_task
    names = [v.name for v in c.variants]
    if "sparse" in names and "dense" in names:
        for task in c.tasks:
            s, d = summary["sparse"].get(task, {}), summary["dense"].get(task, {})
            summary["dense_over_sparse"][task] = {
                k: (d[k] / s[k] if s.get(k) and d.get(k) is not None else None) for k in ("nodes", "edges")}
    write_json(summary, out / "circuits.json")
    (out / "report.md").write_text(report_markdown(c, summary))
    return summary


def report_markdown(c: CircuitsConfig, summary: dict) -> str:
    """The circuit sizes per model and task at the target loss, and the dense/sparse ratios."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)

    lines = [f"# Circuits at target task loss {c.prune.target_loss}", "",
             "| model | L0 | val LM loss | task | nodes | edges | task loss | sufficient | necessary "
             "(loss with circuit ablated) |", "|---|---|---|---|---|---|---|---|---|"]
    for v in c.variants:
        m = summary["models"].get(v.name, {})
        for task in c.tasks:
            r = summary.get(v.name, {}).get(task)
            if r is None:
                continue
            lines.append(f"| {v.name} | {v.l0_target:g} | {fmt(m.get('val_loss'))} | {task} | "
                         f"{fmt(r['nodes']) if r['reached'] else 'not reached'} | {fmt(r['edges'])} | "
                         f"{fmt(r['task_loss'])} | {fmt(r.get('sufficient'))} | "
                         f"{fmt(r.get('necessary'))} ({fmt(r.get('necessity_loss'))}) |")
    if summary["dense_over_sparse"]:
        lines += ["", "| task | dense/sparse nodes | dense/sparse edges |", "|---|---|---|"]
        for task, r in summary["dense_over_sparse"].items():
            lines.append(f"| {task} | {fmt(r['nodes'], '.2f')} | {fmt(r['edges'], '.2f')} |")
    return "\n".join(lines) + "\n"


def objective(result: dict) -> float:
    """What the search minimises: circuit nodes when the target is reached, else worse than any circuit."""
    if result.get("reached"):
        return float(result["n_nodes"])
    return float(result["total_nodes"]) + 1.0 + min(float(result.get("task_loss") or math.inf), 1e3)


def run_all(c: CircuitsConfig, out: str | Path, search: bool = True, progress: bool = True) -> dict:
    """Everything: data, every variant trained, every (variant, task) pruned, the summary."""
    from cca_ray.circuits.search import search_circuit

    out = Path(out)
    check_out(c, out)
    start = time.perf_counter()
    train_all(c, out, [v.name for v in c.variants], progress)
    for v in c.variants:
        for task in c.tasks:
            if (circuit_dir(out, v.name, task) / "circuit.json").is_file():
                log.info("%s/%s: circuit already found, reusing", v.name, task)
                continue
            if search:
                best, trials = search_circuit(c, out, v.name, task, progress)
            else:
                best, trials = prune_one(c, out, v.name, task, progress=progress), None
            finalize(c, out, v.name, task, best, trials)
    summary = summarize(c, out)
    summary["seconds"] = time.perf_counter() - start
    return summary
