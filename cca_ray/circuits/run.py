"""The circuits loop end to end, every step a keyed stage under OUT/stages (so a rerun or a killed
job resumes, and a changed setting recomputes exactly what depends on it): corpus + tokenizer ->
sparse and dense models -> ablation means -> pruning (with or without the Tune search) per
(model, task) -> circuit JSON, picture, snippets -> bridges between the two models -> circuits.json.

OUT/
  config.yaml                 the config of the run (a later run with other data/model/train refuses)
  run.log                     every command's and worker's log
  stages/                     data-, model-<variant>-, means-<variant>- (see artifacts.py),
                              prune-<variant>-<task>-<key>/    result.json, trials/ (one JSON per Tune trial)
                                keyed by the model, the prune section, the task and the search section
                                when searched
                              circuit-<variant>-<task>-<key>/  circuit.json, circuit.png, snippets.md
                                keyed by the pruning result and the report section
                              bridges-<key>/   bridges.safetensors, bridges.json (training history,
                                task loss of every bridged forward pass on held-out pairs)
  circuits/<variant>/<task>/  the latest circuit of each (model, task), copied from its two stages
                              (+ stages.json naming them, which `report --redraw` starts from)
  circuits.json, report.md    every (model, task): nodes, edges, task_loss, sufficient, necessary; ratios
  checkpoints/, tune/         a model's checkpoints while it trains; Tune's experiments
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from cca_ray.circuits.artifacts import Artifacts
from cca_ray.circuits.config import CircuitsConfig
from cca_ray.circuits.report import finalize, summarize
from cca_ray.circuits.search import search_circuit
from cca_ray.config import ConfigError
from cca_ray.io import atomic_write, write_json, write_text
from cca_ray.logs import setup_logging
from cca_ray.stages import stage_key

log = logging.getLogger(__name__)

_FROZEN = ("corpus", "model", "train", "variants")  # sections whose change would mix models in OUT


def check_out(c: CircuitsConfig, out: Path) -> None:
    """Record the config in OUT; refuse another corpus/model/train config there, so OUT's circuits,
    circuits.json and config.yaml always describe one set of models."""
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


def train_all(a: Artifacts, names: list[str], progress: bool = True) -> None:
    """Train the variants: as concurrent Ray tasks when Ray is up, else one after another."""
    import ray

    a.data()  # once, before any worker needs it
    # matched-loss variants wait for their reference, so only the others train side by side
    todo = [n for n in names if not a.trained(n) and not a.c.variant(n).match_loss_of]
    if len(todo) > 1 and ray.is_initialized():
        from cca_ray.ray_base import actor_options

        remote = ray.remote(_train_task).options(**actor_options(a.c.train_resources))
        log.info("training %s as %d concurrent Ray tasks", ", ".join(todo), len(todo))
        ray.get([remote.remote(a.c.model_dump(mode="json"), str(a.out), n) for n in todo])
    for n in names:
        a.train(n, progress)  # reuses what the Ray tasks trained


def _train_task(config: dict, out: str, name: str) -> str:
    setup_logging(out)
    return str(Artifacts(CircuitsConfig.model_validate(config), out).train(name, progress=True, alone=False))


def prune_circuit(a: Artifacts, variant: str, task: str, search: bool, progress: bool = True,
                  force: bool = False) -> dict:
    """One (model, task): its pruning (Tune search unless ``search`` is False) and its circuit,
    each reused when its stage exists (``force``: prune again), then copied to OUT/circuits/."""
    path, meta = _prune_stage(a, variant, task, search, progress, force)
    return _circuit(a, variant, task, path, meta)


def _prune_stage(a: Artifacts, variant: str, task: str, search: bool, progress: bool = True,
                 force: bool = False) -> tuple[Path, dict]:
    """The pruning stage of one (model, task), reused when it exists (``force``: prune again)."""
    a.model_dir(variant)  # a clear error before any stage when the model is not trained
    name, key = f"prune-{variant}-{task}", a.prune_key(variant, task, search)
    if force:
        shutil.rmtree(a.store.path(name, key), ignore_errors=True)

    def compute(tmp: Path) -> dict:
        if search:
            result, trials = search_circuit(a, variant, task, tmp / "trials", progress)
        else:
            result, trials = a.prune_one(variant, task, progress=progress), None
        write_json({"result": result, "trials": trials}, tmp / "result.json")
        return {"variant": variant, "task": task, "searched": search, "model_key": a.model_key(variant),
                "reached": bool(result.get("reached")), "n_nodes": result.get("n_nodes"),
                "result_sha": hashlib.sha256((tmp / "result.json").read_bytes()).hexdigest()}

    return a.store.run(name, key, compute)


def pruned(a: Artifacts, variant: str, task: str, search: bool) -> bool:
    """Whether this (model, task)'s pruning stage is finished."""
    return a.store.meta(f"prune-{variant}-{task}", a.prune_key(variant, task, search)) is not None


def prune_all(a: Artifacts, pairs: list[tuple[str, str]], search: bool, progress: bool = True,
              force: bool = False) -> dict[tuple[str, str], dict]:
    """Every (model, task) of ``pairs``, pruned and drawn; returns their circuits.

    With the Tune search and Ray up, the searches run as concurrent Ray tasks (at most
    search.max_concurrent_searches), so their trials share the cluster's CPUs: one search's slow
    trial no longer leaves a CPU idle until it ends, and on a cluster every (model, task) searches at
    once. Each trial is pinned (one process, fixed threads), so the circuits are the same as one
    search after another. A failed search does not stop the others; the first failure is raised
    once all have ended (every finished stage is kept)."""
    import ray

    todo = [p for p in pairs if force or not pruned(a, *p, search)]
    limit = a.c.search.max_concurrent_searches
    if search and len(todo) > 1 and limit > 1 and ray.is_initialized():
        from tqdm.auto import tqdm

        # the denser a model, the more nodes its pruning bisects and cleans up: its searches start first,
        # so that no long search is left running alone at the end (longest first)
        todo.sort(key=lambda p: -a.c.variant(p[0]).l0_target)
        for v in dict.fromkeys(v for v, _ in todo):
            a.load(v)  # each model's means once, before its searches read them
        job = ray.remote(num_cpus=0, max_retries=0)(_prune_task)
        config, out = a.c.model_dump(mode="json"), str(a.out)
        log.info("pruning %d (model, task) searches as concurrent Ray tasks, %d at a time", len(todo), limit)
        waiting, running, errors = list(todo), {}, []
        bar = tqdm(total=len(todo), desc="Tune searches", disable=not progress)
        while waiting or running:
            while waiting and len(running) < limit:
                v, t = waiting.pop(0)
                running[job.remote(config, out, v, t, force)] = (v, t)
            done, _ = ray.wait(list(running), num_returns=1)
            v, t = running.pop(done[0])
            try:
                meta = ray.get(done[0])
                log.info("%s/%s: search done, %s nodes (target reached: %s)", v, t, meta.get("n_nodes"),
                         meta.get("reached"))
            except Exception as exc:  # the others go on; raised once all have ended
                log.error("%s/%s: search failed: %s", v, t, exc)
                errors.append(exc)
            bar.update(1)
        bar.close()
        if errors:
            raise errors[0]
        force = False  # every stage of todo is fresh now
    return {(v, t): prune_circuit(a, v, t, search, progress, force) for v, t in pairs}


def _prune_task(config: dict, out: str, variant: str, task: str, force: bool) -> dict:
    """A Ray task: one (model, task)'s searched pruning stage; returns its meta."""
    setup_logging(out, stdout=False)
    a = Artifacts(CircuitsConfig.model_validate(config), out)
    return _prune_stage(a, variant, task, True, progress=False, force=force)[1]


def _circuit(a: Artifacts, variant: str, task: str, prune_path: Path, prune_meta: dict,
             redo: bool = False) -> dict:
    """The circuit stage of a pruning stage (``redo``: draw it again), copied to OUT/circuits/."""
    name = f"circuit-{variant}-{task}"
    key = stage_key("circuits-circuit", prune_meta["key"], prune_meta["result_sha"], a.c.report.model_dump())
    if redo:
        shutil.rmtree(a.store.path(name, key), ignore_errors=True)

    def compute(tmp: Path) -> dict:
        stored = json.loads((prune_path / "result.json").read_text())
        ci = finalize(a, variant, task, stored["result"], stored["trials"], tmp)
        return {"reached": bool(ci.get("reached")), "n_nodes": ci.get("n_nodes"),
                "n_edges": ci.get("n_edges")}

    path, _ = a.store.run(name, key, compute)
    _publish(a.circuit_dir(variant, task), prune_path, path)
    return json.loads((path / "circuit.json").read_text())


def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda f: f.write(src.read_bytes()), binary=True)


def _publish(view: Path, prune_path: Path, circuit_path: Path) -> None:
    """Make OUT/circuits/<variant>/<task>/ hold this circuit: its files, the pruning result and
    trials, and stages.json naming both stages; files of an earlier circuit there are removed."""
    files = {p.name: p for p in circuit_path.iterdir() if p.is_file() and p.name != "meta.json"}
    files["result.json"] = prune_path / "result.json"
    trials = sorted((prune_path / "trials").glob("*.json"))
    keep = set(files) | {f"trials/{p.name}" for p in trials} | {"stages.json"}
    if view.is_dir():
        for old in view.rglob("*"):
            if old.is_file() and old.relative_to(view).as_posix() not in keep:
                old.unlink()
    for fname, src in files.items():
        _copy(src, view / fname)
    for p in trials:
        _copy(p, view / "trials" / p.name)
    write_json({"prune": prune_path.name, "circuit": circuit_path.name}, view / "stages.json")


def redraw(a: Artifacts) -> list[str]:
    """Draw every circuit in OUT/circuits/ again from its stored pruning result (e.g. after
    changing the `report` settings); nothing is pruned again."""
    done = []
    for v in a.c.variants:
        for task in a.c.tasks:
            pointer = a.circuit_dir(v.name, task) / "stages.json"
            if not pointer.is_file():
                continue
            prune_path = a.store.root / json.loads(pointer.read_text())["prune"]
            if not (prune_path / "meta.json").is_file():
                log.warning("%s/%s: its pruning stage %s is gone; prune again", v.name, task, prune_path)
                continue
            meta = json.loads((prune_path / "meta.json").read_text())
            if meta.get("model_key") != a.model_key(v.name):
                log.warning("%s/%s: pruned on another model than this config's; not redrawn", v.name, task)
                continue
            _circuit(a, v.name, task, prune_path, meta, redo=True)
            done.append(f"{v.name}/{task}")
    return done


def run_all(a: Artifacts, search: bool = True, progress: bool = True) -> dict:
    """Everything: data, every variant trained, every (variant, task) pruned, the summary."""
    check_out(a.c, a.out)
    start = time.perf_counter()
    train_all(a, [v.name for v in a.c.variants], progress)
    prune_all(a, [(v.name, t) for v in a.c.variants for t in a.c.tasks], search, progress)
    a.bridges(progress)
    summary = summarize(a)
    summary["seconds"] = time.perf_counter() - start
    return summary
