"""The "no mask" baseline: the CCA logit-difference update (same loss, full-batch gradient, plain
gradient descent, same validation schedule) on every parameter instead of the selected rows, to
show what the localisation buys."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from cca_ray.dcm.batches import Example, full_logits, logit_difference
from cca_ray.update.sft import SFTResult, changed_only, restore_base
from cca_ray.update.train import UpdateError, micro_batches, validation_steps

log = logging.getLogger("cca_ray")


def all_parameter_update(model, examples: list[Example], pad_id: int,
                         validate: Callable[[dict[str, torch.Tensor]], float], lr: float = 1e-4,
                         steps: int = 50, micro_batch_size: int = 8, progress: bool = True,
                         desc: str = "no-mask update") -> SFTResult:
    """W -= lr * grad(-mean logit difference) for every parameter; validated at step 0, 2, 4, 6,
    8, 10, then every 5; returns the best step's weights and hands the model back at its base."""
    if not examples:
        raise UpdateError("the update got no localisation examples")
    start = time.perf_counter()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    micro = micro_batches(examples, micro_batch_size)
    checks = set(validation_steps(steps))

    def current() -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in params.items()}

    weights = current()
    n_params = sum(p.numel() for p in params.values())
    best = SFTResult(0, validate(weights), weights, trainable_parameters=n_params)
    best.history.append({"step": 0, "val_accuracy": best.best_val, "loss": None})
    try:
        for step in tqdm(range(1, steps + 1), desc=desc, unit="step", disable=not progress):
            model.zero_grad(set_to_none=True)
            total = 0.0
            for batch in micro:
                loss = -logit_difference(full_logits(model, batch, pad_id), batch).sum() / len(examples)
                loss.backward()
                total += loss.item()
            if not torch.isfinite(torch.tensor(total)):
                raise UpdateError(f"update loss is {total} at step {step} (lr {lr}): lower the lr")
            with torch.no_grad():
                for p in params.values():
                    if p.grad is not None:
                        p -= lr * p.grad
            record = {"step": step, "loss": total}
            if step in checks:
                weights = current()
                record["val_accuracy"] = validate(weights)
                if record["val_accuracy"] > best.best_val:
                    best.best_step, best.best_val, best.best_weights = step, record["val_accuracy"], weights
                log.info("%s step %d: loss %.4f, val accuracy %.4f", desc, step, total,
                         record["val_accuracy"])
            best.history.append(record)
    finally:
        restore_base(model, base)
    return changed_only(best, base, start)
