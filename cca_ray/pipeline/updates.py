"""The update stages of a run, one run at one lr each, cached in the stage store: a row update on
a selection (CCA's or a random one), CCA's loss on every parameter (no mask), and supervised
fine-tuning (full or LoRA). Each validates on GSym-Val through the run's engines and keeps its
best step; methods.py says which method uses which."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from cca_ray.components import component_space
from cca_ray.data.answers import macro_accuracy
from cca_ray.data.gsm_symbolic import Problem
from cca_ray.io import read_json, write_json, write_safetensors
from cca_ray.localize import Pivot
from cca_ray.methods import method
from cca_ray.pipeline import keys
from cca_ray.pipeline.run import Mask, Pipeline, Prepared, pivot_examples
from cca_ray.sampling.weights import WeightUpdate
from cca_ray.update import RowDeltas, selected_rows, targeted_update
from cca_ray.update.diagnostics import pivot_diagnostics


def update_subset(pivots: list[Pivot], max_examples: int | None) -> list[Pivot]:
    """The train pivots an update steps on: all, or a seeded subset of ``max_examples`` (in their
    order). DCM learns its mask on every train pivot; each update step is a full-batch pass, so a
    subset keeps it affordable."""
    if not max_examples or len(pivots) <= max_examples:
        return pivots
    keep = set(random.Random(0).sample(range(len(pivots)), max_examples))
    return [p for i, p in enumerate(pivots) if i in keep]


def validations(run: dict) -> list[tuple[int, float]]:
    """(step, val accuracy) of every validation a stored run made, in order (from its history)."""
    return [(h["step"], h["val_accuracy"]) for h in read_json(Path(run["path"]) / "history.json")
            if "val_accuracy" in h]


def validator(pipe: Pipeline, arm: str, lr: float, val: list[Problem], steps: list[int],
              pushed: set[str] | None = None) -> Callable[[WeightUpdate], float]:
    """validate(weights) for an update: push the weights (whole, changed rows or a LoRA product) to
    the engine, macro val accuracy, and tell pipe.on_validation at each scheduled step; ``pushed``
    collects the names sent."""
    marks = iter(steps)

    def val_acc(weights: WeightUpdate) -> float:
        pipe.engines.push(weights)
        if pushed is not None:
            pushed.update(weights)
        correct = pipe.engines.greedy(val, "val")
        acc = macro_accuracy([(q.id, correct[q.key]) for q in val])
        if pipe.on_validation is not None:
            pipe.on_validation({"arm": arm, "lr": lr, "step": next(marks), "val_accuracy": acc})
        return acc

    return val_acc


def _save_deltas(deltas: list[torch.Tensor], path: Path) -> None:
    write_safetensors({f"delta.{i}": d for i, d in enumerate(deltas)}, path)


def rows_run(pipe: Pipeline, name: str, arm: str, selected: dict[str, torch.Tensor], mask: Mask,
             prep: Prepared, lr: float) -> dict:
    """One targeted update of method ``name`` (its run ``arm``: CCA, or a random seed) at one lr on the
    train pivots; stores the deltas
    of the best step (step 0 included) and of the best step >= 1, and the pivot diagnostics of both
    on the train and the held-out pivots."""
    config, settings = pipe.config, pipe.config.update
    key = keys.rows_update_key(config, mask.key, arm, lr)
    stage = f"update-{arm}-lr{lr:g}"
    kind = method(name)

    def compute(tmp: Path) -> dict:
        model, pad = pipe.m.model, pipe.m.tokenizer.pad_token_id
        space = component_space(model, config.model.architecture)
        rows = selected_rows(model, space, selected, settings.kinds)
        val_acc = validator(pipe, arm, lr, prep.splits.val, kind.schedule(config))
        examples = pivot_examples(update_subset(prep.pivots, settings.max_examples))
        common = dict(lr=lr, steps=settings.steps, optimizer=settings.optimizer,
                      micro_batch_size=settings.micro_batch_size, progress=pipe.progress, desc=stage)
        try:
            if settings.zero_stage is None:
                res = targeted_update(model, RowDeltas(model, rows), examples, pad, val_acc, **common,
                                      gradient_checkpointing=settings.gradient_checkpointing)
            else:
                from cca_ray.update.deepspeed import zero_targeted_update

                res = zero_targeted_update(model, rows, examples, pad, val_acc,
                                           zero_stage=settings.zero_stage, **common)
        finally:
            pipe.engines.push(dict.fromkeys(rows))  # the engine back to the checkpoint's weights
        _save_deltas(res.best, tmp / "best_deltas.safetensors")
        _save_deltas(res.last, tmp / "last_deltas.safetensors")
        _save_deltas(res.best_updated, tmp / "best_updated_deltas.safetensors")
        write_safetensors(dict(rows), tmp / "rows.safetensors")
        write_json(res.history, tmp / "history.json")
        diagnostics = pivot_diagnostics(
            model, rows, {"best": res.best, "best_updated": res.best_updated},
            {"train": examples, "held_out": pivot_examples(prep.heldout)}, pad, settings.micro_batch_size)
        return {"arm": arm, "lr": lr, "best_step": res.best_step, "best_val": res.best_val,
                "best_updated_step": res.best_updated_step, "best_updated_val": res.best_updated_val,
                "trainable_parameters": res.trainable_parameters,
                "changed_parameters": sum(int((d != 0).sum()) for d in res.best), "pivots": diagnostics}

    path, meta = pipe.store.run(stage, key, compute)
    pipe.timed(kind.timing, meta)
    return meta | {"path": str(path)}


def _weights_stage(pipe: Pipeline, name: str, lr: float, key: str, prep: Prepared,
                   train: Callable[[Callable], object]) -> dict:
    """A whole-parameter baseline's stage: ``train(validate)`` returns the result; the best step's
    changed weights (LoRA: merged) are stored as best_weights.safetensors."""
    m = method(name)
    stage = f"update-{name}-lr{lr:g}"

    def compute(tmp: Path) -> dict:
        pushed: set[str] = set()
        try:
            res = train(validator(pipe, name, lr, prep.splits.val, m.schedule(pipe.config), pushed))
        finally:
            pipe.engines.push(dict.fromkeys(pushed))  # the engine back to the checkpoint's weights
        write_safetensors(res.best, tmp / "best_weights.safetensors")
        write_json(res.history, tmp / "history.json")
        return {"arm": name, "lr": lr, "best_step": res.best_step, "best_val": res.best_val,
                "trainable_parameters": res.trainable_parameters,
                "changed_parameters": res.changed_parameters}

    path, meta = pipe.store.run(stage, key, compute)
    pipe.timed(m.timing, meta)
    return meta | {"path": str(path)}


def nomask_run(pipe: Pipeline, name: str, lr: float, prep: Prepared) -> dict:
    """CCA's logit-difference update on every parameter (what the localisation buys)."""
    from cca_ray.update.nomask import all_parameter_update

    config, settings = pipe.config, pipe.config.update

    def train(validate):
        examples = pivot_examples(update_subset(prep.pivots, settings.max_examples))
        return all_parameter_update(pipe.m.model, examples, pipe.m.tokenizer.pad_token_id, validate, lr=lr,
                                    steps=settings.steps, micro_batch_size=settings.micro_batch_size,
                                    progress=pipe.progress, desc=f"update-{name}-lr{lr:g}")

    return _weights_stage(pipe, name, lr, keys.nomask_key(config, prep.split_key, name, lr), prep, train)


def sft_run(pipe: Pipeline, name: str, lr: float, prep: Prepared, lora: bool) -> dict:
    """Supervised fine-tuning on the kept templates' GSym-Train reference answers (full or LoRA)."""
    from cca_ray.update.sft import finetune, sft_examples

    config, sft = pipe.config, pipe.config.compare.sft

    def train(validate):
        kept = set(prep.kept)
        problems = [q for q in prep.splits.train if q.id in kept]
        examples = sft_examples(problems, pipe.m.prompt(config), pipe.m.tokenizer, sft.max_length)
        return finetune(pipe.m.model, examples, pipe.m.tokenizer.pad_token_id, validate,
                        lora=lora, lr=lr, steps=sft.steps, batch_size=sft.batch_size,
                        weight_decay=sft.weight_decay, max_grad_norm=sft.max_grad_norm,
                        warmup_fraction=sft.warmup_fraction, eval_every=sft.eval_every, seed=config.data.seed,
                        lora_r=sft.lora_r, lora_alpha=sft.lora_alpha, lora_dropout=sft.lora_dropout,
                        zero_stage=None if lora else sft.zero_stage, progress=pipe.progress,
                        desc=f"update-{name}-lr{lr:g}")

    key = keys.sft_key(config, prep.base_key, prep.kept, name, lr, lora)
    return _weights_stage(pipe, name, lr, key, prep, train)
