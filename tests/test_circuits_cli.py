"""`cca-ray circuits` end to end on a tiny config: corpus, sparse + dense training, pruning without
and with the Ray Tune search (a real local Ray), circuit JSON / picture / snippets, circuits.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cca_ray.circuits.artifacts import objective
from cca_ray.cli import main

TINY = {
    "corpus": {"train_docs": 600, "val_docs": 100, "vocab_size": 256},
    "model": {"n_layer": 1, "d_model": 32, "d_head": 8, "d_mlp": 64, "n_ctx": 64},
    "train": {"steps": 60, "batch_size": 8, "eval_every": 30, "eval_batches": 2, "checkpoint_every": 30},
    "variants": [{"name": "sparse", "l0_target": 0.25}, {"name": "dense", "l0_target": 1.0}],
    "tasks": ["single_double_quote"],
    "prune": {"steps": 30, "batch_pairs": 8, "train_pairs": 16, "val_pairs": 16, "test_pairs": 16,
              "mean_windows": 16, "target_loss": 0.6, "k_coef": 5e-4, "lr": 0.02},
    "search": {"num_samples": 2, "max_concurrent_trials": 2},
    "report": {"snippet_windows": 16, "snippets_per_node": 2},
    "bridges": {"steps": 10, "batch_size": 4},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = root / "out"
    import ray

    try:  # two variants: trained as two concurrent Ray tasks on a local Ray the command starts
        rc = main(["circuits", "run", "--config", str(cfg), "--out", str(out), "--no-search", "--quiet"])
    finally:
        ray.shutdown()
    return cfg, out, rc


def _check_circuit(circuit: dict) -> None:
    names = {n["name"] for n in circuit["nodes"]}
    if circuit["reached"]:
        assert circuit["n_nodes"] == len(circuit["nodes"])
        residual = sum(e["kind"] == "residual" for e in circuit["edges"])  # counted apart, as the paper does
        assert circuit["n_edges"] == len(circuit["edges"]) - residual
        assert circuit["n_residual_links"] == residual
        assert all(e["src"] in names and e["dst"] in names and e["weight"] != 0 for e in circuit["edges"])
        assert circuit["task_loss"] is not None and circuit["sufficient"] == (circuit["task_loss"] <= 0.6)
    else:
        assert circuit["n_nodes"] is None and circuit["nodes"] == []


def test_run_writes_circuits_for_both_models(tiny_run):
    cfg, out, rc = tiny_run
    assert rc == 0
    summary = json.loads((out / "circuits.json").read_text())
    for variant in ("sparse", "dense"):
        row = summary[variant]["single_double_quote"]
        assert set(row) >= {"nodes", "edges", "task_loss", "sufficient", "necessary"}
        d = out / "circuits" / variant / "single_double_quote"
        circuit = json.loads((d / "circuit.json").read_text())
        _check_circuit(circuit)
        assert row["nodes"] == circuit["n_nodes"] and row["edges"] == circuit["n_edges"]
        if circuit["reached"]:
            assert (d / "circuit.png").stat().st_size > 1000
            assert set(circuit["snippets"]) == {n["name"] for n in circuit["nodes"]}
    models = summary["models"]
    assert models["sparse"]["nonzero_fraction"] == pytest.approx(0.25, abs=0.01)
    assert models["dense"]["nonzero_fraction"] > 0.99
    assert "dense/sparse" in (out / "report.md").read_text()
    bridges = summary["bridges"]  # one layer: two sites (after attention, after the MLP)
    losses = bridges["task_loss"]["single_double_quote"]
    assert len(losses["encoded"]) == len(losses["decoded"]) == 2 and losses["dense"] > 0
    assert set(bridges["final"]) >= {"nmse_enc", "nmse_dec", "kl_enc", "kl_dec"}
    assert "encode -> sparse" in (out / "report.md").read_text()
    ratio = summary["dense_over_sparse"]["single_double_quote"]["edges"]
    if ratio is not None:  # one task: the geometric mean over tasks is that task's ratio
        assert summary["dense_over_sparse_geomean"]["edges"] == pytest.approx(ratio)


def test_report_rebuilds_the_summary_and_a_changed_model_config_is_refused(tiny_run, tmp_path, capsys):
    cfg, out, _ = tiny_run
    before = json.loads((out / "circuits.json").read_text())
    (out / "circuits.json").unlink()
    assert main(["circuits", "report", "--out", str(out)]) == 0
    assert json.loads((out / "circuits.json").read_text()) == before
    assert "| sparse |" in capsys.readouterr().out
    # --redraw rebuilds each circuit from its stored pruning result, without pruning again
    d = out / "circuits" / "sparse" / "single_double_quote"
    first = json.loads((d / "circuit.json").read_text())
    (d / "circuit.json").unlink()
    assert main(["circuits", "report", "--out", str(out), "--redraw"]) == 0
    assert "redrew sparse/single_double_quote, dense/single_double_quote" in capsys.readouterr().out
    again = json.loads((d / "circuit.json").read_text())
    assert (again["n_nodes"], again["edges"]) == (first["n_nodes"], first["edges"])
    if again["reached"]:
        assert all("⟦" in r["text"] for rows in again["snippets"].values() for r in rows)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], "d_model": 64}}))
    assert main(["circuits", "train", "--config", str(other), "--out", str(out), "--quiet"]) == 2
    assert "different model config" in capsys.readouterr().err


def test_prune_before_training_names_the_fix(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    rc = main(["circuits", "prune", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-search"])
    assert rc == 2 and "cca-ray circuits train" in capsys.readouterr().err


def _searched(out) -> dict:
    """What a search decides per model: its circuit, and each trial's params and objective."""
    found = {}
    for variant in ("sparse", "dense"):
        d = out / "circuits" / variant / "single_double_quote"
        c = json.loads((d / "circuit.json").read_text())
        # each search ran its own model's trials (concurrent searches sharing a trainable's name did not)
        assert {json.loads(t.read_text())["variant"] for t in (d / "trials").glob("*.json")} == {variant}
        found[variant] = {"nodes": c["n_nodes"], "edges": c["edges"], "task_loss": c["task_loss"],
                          "trials": sorted((json.dumps(t["params"], sort_keys=True), t["objective"])
                                           for t in c["trials"])}
    return found


def test_tune_search_keeps_the_smallest_circuit(tiny_run, tmp_path):
    import ray

    cfg, out, _ = tiny_run
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:  # both models' searches at once (Ray tasks sharing the 2 CPUs), then one after the other
        rc = main(["circuits", "prune", "--out", str(out), "--force", "--quiet"])
        together = _searched(out)
        one_at_a_time = tmp_path / "one.yaml"
        alone = {**TINY, "search": {**TINY["search"], "max_concurrent_searches": 1}}
        one_at_a_time.write_text(yaml.safe_dump(alone))
        rc_alone = main(["circuits", "prune", "--config", str(one_at_a_time), "--out", str(out), "--force",
                         "--quiet"])
    finally:
        ray.shutdown()
    assert rc == rc_alone == 0
    assert "pruning 2 (model, task) searches as concurrent Ray tasks" in (out / "run.log").read_text()
    assert _searched(out) == together  # pinned trials: the same circuits however the searches share CPUs
    d = out / "circuits" / "sparse" / "single_double_quote"
    circuit = json.loads((d / "circuit.json").read_text())
    trials = circuit["trials"]
    assert len(trials) == 2 and len(list((d / "trials").glob("*.json"))) == 2
    # the first trial is the config's pruning values (the paper's search centres)
    assert any(t["params"] == {"controller_level": pytest.approx(0.5), "lr": pytest.approx(0.02), "seed": 0}
               for t in trials)
    assert all(isinstance(t["params"]["seed"], int) and 0 <= t["params"]["seed"] <= 15 for t in trials)
    best = min(t["objective"] for t in trials)
    assert circuit["search"]["best_trial"] in {t["trial_id"] for t in trials if t["objective"] == best}
    assert objective(circuit) == best  # nodes, + every node if it fails the held-out checks
    _check_circuit(circuit)


def test_each_model_and_task_searches_from_its_own_seed():
    """One seed for every search made each (model, task) try the same second point; mixed with their
    names, the eight searches' seeds differ, and so do Optuna's proposals after the centres."""
    from cca_ray.circuits.config import CircuitsConfig
    from cca_ray.circuits.search import search_seed, search_space
    from cca_ray.circuits.tasks import TASKS
    from cca_ray.ray_base import search_algorithm

    seeds = {(v, t): search_seed(0, v, t) for v in ("sparse", "dense") for t in TASKS}
    assert len(set(seeds.values())) == len(seeds) == 8
    quote_seed = seeds["sparse", TASKS[0]]
    assert search_seed(0, "sparse", TASKS[0]) == quote_seed != search_seed(1, "sparse", TASKS[0])
    c = CircuitsConfig()
    centres = {k: getattr(c.prune, k) for k in c.search.space}

    def proposals(seed: int) -> list[dict]:
        alg = search_algorithm("optuna", seed, [centres])
        alg.set_search_properties("objective", "min", search_space(c))
        return [alg.suggest(f"t{i}") for i in range(2)]

    quote, brackets = proposals(seeds["sparse", TASKS[0]]), proposals(seeds["sparse", TASKS[1]])
    assert quote[0] == brackets[0] == centres  # the first trial: the config's values
    assert quote[1] != brackets[1]
    assert proposals(seeds["sparse", TASKS[0]]) == quote  # reproducible


# ---- stages: a changed setting recomputes exactly what depends on it ------------------------------

ONE = {**TINY, "variants": [{"name": "sparse", "l0_target": 0.25}]}
PRUNED = ["prune-sparse-single_double_quote", "circuit-sparse-single_double_quote"]


def _run(raw: dict, out):
    from cca_ray.circuits.artifacts import Artifacts
    from cca_ray.circuits.config import CircuitsConfig
    from cca_ray.circuits.run import run_all

    a = Artifacts(CircuitsConfig.model_validate(raw), out)
    run_all(a, search=False, progress=False)  # no Ray is up: everything in this process
    return a


def _stage_files(out) -> dict:
    return {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*") if p.is_file()}


def test_a_changed_prune_setting_recomputes_the_circuits_and_not_the_models(tmp_path):
    out = tmp_path / "out"
    first = _run(ONE, out)
    assert first.store.computed == ["data", "model-sparse", "means-sparse", *PRUNED]
    files = _stage_files(out)

    same = _run(ONE, out)  # the same config: every stage reused, not one file rewritten
    assert same.store.computed == []
    assert set(same.store.reused) == {"data", "model-sparse", *PRUNED}  # means: only when pruning
    assert _stage_files(out) == files

    view = out / "circuits" / "sparse" / "single_double_quote"
    for change in ({"target_loss": 0.5}, {"target_loss": 0.5, "lr": 0.01}):
        raw = {**ONE, "prune": {**ONE["prune"], **change}}
        again = _run(raw, out)
        assert again.store.computed == PRUNED  # the circuit again, on the same model and means
        assert {"data", "model-sparse", "means-sparse"} <= set(again.store.reused)
        circuit = json.loads((view / "circuit.json").read_text())
        assert {k: circuit["hyperparameters"][k] for k in change} == change
        assert "# Circuits at target task loss 0.5" in (out / "report.md").read_text()
    assert all(p.is_file() and p.stat().st_mtime_ns == t for p, t in files.items())  # kept, untouched
    assert len(list((out / "stages").glob("prune-*/meta.json"))) == 3
    assert len(list((out / "stages").glob("model-*/meta.json"))) == 1

    # the ablation means' windows: new means and circuit, the same model
    again = _run({**raw, "prune": {**raw["prune"], "mean_windows": 8}}, out)
    assert again.store.computed == ["means-sparse", *PRUNED]
    # a report-only setting draws the circuit again and prunes nothing
    again = _run({**raw, "prune": {**raw["prune"], "mean_windows": 8},
                  "report": {**ONE["report"], "snippets_per_node": 1}}, out)
    assert again.store.computed == ["circuit-sparse-single_double_quote"]


def test_thread_counts_are_keyed_and_cpu_reservations_are_not(tmp_path):
    """Thread counts change float summation order, so results: keyed. Ray's CPU reservation: not."""
    from cca_ray.circuits.artifacts import Artifacts
    from cca_ray.circuits.config import CircuitsConfig

    def keys(raw: dict) -> tuple[str, str]:
        a = Artifacts(CircuitsConfig.model_validate(raw), tmp_path)
        return a.model_key("sparse"), a.prune_key("sparse", "single_double_quote", searched=True)

    model, pruned = keys(ONE)
    search = ONE.get("search", {})

    def with_trial(**trial) -> dict:
        return {**ONE, "search": {**search, "trial": {**search.get("trial", {}), **trial}}}

    assert keys({**ONE, "train": {**ONE["train"], "threads": 1}})[0] != model
    assert keys(with_trial(threads=2))[1] != pruned
    assert keys(with_trial(num_cpus=2)) == (model, pruned)


def _killed_training(config: dict, out: str, ckpt: str) -> None:
    """Train the sparse variant of `config` and die at step 45 (in a pinned child, as a.train runs)."""
    from cca_ray.circuits.artifacts import Artifacts
    from cca_ray.circuits.config import CircuitsConfig
    from cca_ray.circuits.train import train

    c = CircuitsConfig.model_validate(config)
    tok, train_tokens, val_tokens = Artifacts(c, out).data()

    def crash(step, model):
        if step == 45:
            raise KeyboardInterrupt

    train(c.model.spec(tok.get_vocab_size()), c.train.spec(0.25), train_tokens, val_tokens,
          Path(out) / "partial", progress=False, on_step=crash, checkpoint=ckpt)


def test_a_killed_training_resumes_from_its_checkpoint(tmp_path):
    import torch

    from cca_ray.circuits.artifacts import Artifacts
    from cca_ray.circuits.config import CircuitsConfig
    from cca_ray.circuits.train import load_model
    from cca_ray.tiny.determinism import run_deterministic

    c = CircuitsConfig.model_validate(ONE)
    a = Artifacts(c, tmp_path / "killed")
    a.data()
    ckpt = a.out / "checkpoints" / f"model-sparse-{a.model_key('sparse')}"
    # what a killed stage leaves: its checkpoint at step 30
    with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
        run_deterministic(_killed_training, ONE, str(a.out), str(ckpt), threads=c.train.threads)
    assert (ckpt / "optimizer.safetensors").is_file()
    resumed = load_model(a.train("sparse", progress=False))
    assert "resuming from step 30" in (a.out / "run.log").read_text()
    assert not ckpt.exists()  # spent once the model is published
    whole = load_model(Artifacts(c, tmp_path / "whole").train("sparse", progress=False))
    for (n, x), (_, y) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(x, y), n  # pinned kernels and threads: bit for bit
