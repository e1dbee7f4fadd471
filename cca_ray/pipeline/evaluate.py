"""The evaluation stages of a run, the only place the test split is touched: each chosen model on
test, the general suite before and after, the export of CCA's model and delta, and the summaries
`cca-ray run` and `cca-ray compare` build their reports from."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cca_ray.components import component_space
from cca_ray.data.answers import macro_accuracy
from cca_ray.data.gsm_symbolic import Problem
from cca_ray.evaluate import accuracy_report, general_deltas, general_scores
from cca_ray.io import atomic_dir, read_jsonl, write_jsonl
from cca_ray.methods import CCA, RANDOM, method
from cca_ray.pipeline import keys
from cca_ray.pipeline.run import Mask, Pipeline, Prepared, correct_map, correct_rows
from cca_ray.update import save_delta
from cca_ray.update.lora_export import write_lora_adapter


def best_run(runs: list[dict], updated: bool = False) -> dict:
    """The run with the best validation (ties: the smaller lr); ``updated``: by its best step >= 1."""
    field = "best_updated_val" if updated else "best_val"
    return max(runs, key=lambda r: (r[field], -r["lr"]))


def test_eval(pipe: Pipeline, arm: str, run: dict, test: list[Problem],
              deltas: str = "best") -> dict[tuple, bool]:
    """Greedy test correctness of a run's best model (``deltas``: "best" or "best_updated")."""
    key = keys.evaluation_key(pipe.config, run["path"], deltas)

    def compute(tmp: Path) -> dict:
        with pipe.engines.applied(run, deltas):
            write_jsonl(correct_rows(pipe.engines.greedy(test, f"test ({arm})")), tmp / "test_correct.jsonl")
        return {}

    path, meta = pipe.store.run(f"test-{arm}", key, compute)
    pipe.timed("evaluation", meta)
    return correct_map(read_jsonl(path / "test_correct.jsonl"))


def general(pipe: Pipeline, arm: str, base_key: str, run: dict | None) -> dict:
    """lm-eval general-suite scores of the base model (``run`` None) or of a run's best model."""
    settings = pipe.config.evaluation
    key = keys.general_key(pipe.config, base_key, run["path"] if run else None)

    def compute(tmp: Path) -> dict:
        def score():  # lm-eval's own results files too, in the stage folder: lm_eval/<arm>/results_*.json
            return general_scores(pipe.m.model, pipe.m.tokenizer, settings.general_tasks,
                                  settings.num_fewshot, pipe.m.local_tasks, settings.limit,
                                  results_dir=tmp / "lm_eval", model_name=arm)
        if run is None:
            return {"scores": score()}
        with pipe.engines.applied(run):
            return {"scores": score()}

    _, meta = pipe.store.run(f"general-{arm}", key, compute)
    pipe.timed("general", meta)
    return meta["scores"]


def general_change(pipe: Pipeline, arm: str, base_key: str, run: dict) -> dict:
    """Per suite task: before, after and their difference for a run's best model."""
    return general_deltas(general(pipe, "base", base_key, None), general(pipe, arm, base_key, run))


def export(pipe: Pipeline, run: dict) -> dict:
    """The updated model as an HF folder (DIR/cca_model), the sparse row delta and, when the update
    changed anything, the same delta as a peft LoRA adapter (DIR/cca_lora)."""
    out = pipe.out / "cca_model"
    params = dict(pipe.m.model.named_parameters())
    with pipe.engines.merged(run) as (rows, new), atomic_dir(out) as tmp:
        pipe.m.model.save_pretrained(tmp, safe_serialization=True)
        pipe.m.tokenizer.save_pretrained(tmp)
        save_delta(rows, new, pipe.out / "cca_delta.safetensors", base=pipe.m.path,
                   extra={"best_step": run["best_step"], "lr": run["lr"]})
    exported = {"model": str(out), "delta": str(pipe.out / "cca_delta.safetensors")}
    lora = pipe.out / "cca_lora"
    shutil.rmtree(lora, ignore_errors=True)  # an earlier invocation's adapter is not this model's
    if run["best_step"] > 0:  # the model is the base again here: its weights are the adapter's base
        delta = {n: (r, new[n]) for n, r in rows.items()}
        info = write_lora_adapter(delta, lambda n: params[n].detach().cpu(), pipe.m.path, lora)
        exported |= {"lora": info["path"], "lora_max_rank": info["max_rank"]}
    return exported


@dataclass
class ArmResult:
    """One arm (CCA or a random seed): its runs over the lr grid, the chosen run (best val, step 0
    included), the best updated run (best val at a step >= 1), and their test correctness."""

    runs: list[dict]
    best: dict
    updated: dict
    test: dict[tuple, bool]
    updated_test: dict[tuple, bool]


def arm_result(pipe: Pipeline, arm: str, runs: list[dict], test: list[Problem]) -> ArmResult:
    """An arm's chosen run and best updated run over its lr grid, each evaluated on test (once,
    when both are the same model)."""
    best, updated = best_run(runs), best_run(runs, updated=True)
    best_test = test_eval(pipe, arm, best, test)
    same = updated["path"] == best["path"] and updated["best_updated_step"] == best["best_step"]
    updated_test = best_test if same else test_eval(pipe, f"{arm}-updated", updated, test, "best_updated")
    return ArmResult(runs, best, updated, best_test, updated_test)


def final_report(pipe: Pipeline, prep: Prepared, mask: Mask, cca_runs: list[dict],
                 random_runs: list[list[dict]]) -> dict:
    """Test evaluation of the chosen and the best updated runs (CCA's lr grid and each random
    seed's), the general suite before/after, the export, and report.json's content."""
    from cca_ray.reports.run import build_report

    test = prep.splits.test
    cca = arm_result(pipe, method(CCA).arm(), cca_runs, test)
    randoms = [arm_result(pipe, method(RANDOM).arm(s), runs, test) for s, runs in enumerate(random_runs)]
    changes = general_change(pipe, method(CCA).arm(), prep.base_key, cca.best)
    exported = export(pipe, cca.best)
    space = component_space(pipe.m.model, pipe.config.model.architecture)
    n_params = sum(p.numel() for p in pipe.m.model.parameters())
    return build_report(pipe.config, pipe.m.path, n_params, prep, mask.meta, space, cca, randoms, changes,
                        pipe.timings, exported)


def base_summary(pipe: Pipeline, prep: Prepared) -> dict:
    """The base model for a comparison: test accuracy (per template), val accuracy, general scores
    and the parameter count."""
    val = [(q.id, prep.correct["val"][q.key]) for q in prep.splits.val]
    return {"test": accuracy_report(prep.splits.test, prep.correct["test"]),
            "val_accuracy": macro_accuracy(val), "general": general(pipe, "base", prep.base_key, None),
            "parameters": sum(t.numel() for t in pipe.m.model.parameters()),
            "test_problems": len(prep.splits.test), "val_problems": len(prep.splits.val)}


def method_result(pipe: Pipeline, name: str, lr: float, prep: Prepared) -> dict:
    """One method at its chosen lr for a comparison: the run (reused from its trial), test accuracy
    per template (random: every seed of update.random_seeds, averaged per template; seed 0 is the
    tuned one), general-suite deltas (random: seed 0), and what it trains and changes."""
    start = time.perf_counter()
    m = method(name)
    mask = pipe.dcm(prep) if m.needs_mask else None
    seeds = m.seeds(pipe.config)
    runs = [pipe.method_run(name, lr, prep, mask, seed=s) for s in seeds]
    tests = [accuracy_report(prep.splits.test, test_eval(pipe, m.arm(s), r, prep.splits.test))
             for s, r in zip(seeds, runs, strict=True)]
    templates = tests[0]["per_template"]
    per_template = {t: sum(x["per_template"][t] for x in tests) / len(tests) for t in templates}
    return {"method": name, "lr": lr, "best_step": runs[0]["best_step"], "val_accuracy": runs[0]["best_val"],
            "test_accuracy": sum(x["accuracy"] for x in tests) / len(tests),
            "seed_test_accuracies": [x["accuracy"] for x in tests] if name == RANDOM else None,
            "per_template_test": per_template,
            "general_deltas": general_change(pipe, m.arm(0), prep.base_key, runs[0]),
            "components_fraction": mask.meta["components_fraction"] if mask else 1.0,
            "trainable_parameters": runs[0]["trainable_parameters"],
            "entries_changed": runs[0]["changed_parameters"],
            "eval_seconds": round(time.perf_counter() - start, 1)}
