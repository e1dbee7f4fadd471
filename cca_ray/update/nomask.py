"""The "no mask" baseline: the CCA logit-difference update (same loss, full-batch gradient, plain
gradient descent, same validation schedule) on every parameter instead of the selected rows, to
show what the localisation buys."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cca_ray.dcm.batches import Example
from cca_ray.sampling.weights import WeightUpdate
from cca_ray.update.loop import TrainResult, UpdateError, keep_best, schedule
from cca_ray.update.sft import changed_only, restore_base
from cca_ray.update.train import accumulate, micro_batches


def all_parameter_update(model, examples: list[Example], pad_id: int,
                         validate: Callable[[WeightUpdate], float], lr: float = 1e-4,
                         steps: int = 50, micro_batch_size: int = 8, progress: bool = True,
                         desc: str = "no-mask update") -> TrainResult[dict[str, torch.Tensor]]:
    """W -= lr * grad(-mean logit difference) for every parameter, validated on `schedule(steps)`;
    the snapshots are the changed parameters' weights (CPU), and the model is handed back at its base."""
    if not examples:
        raise UpdateError("the update got no localisation examples")
    start = time.perf_counter()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    micro = micro_batches(examples, micro_batch_size)

    def current() -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in params.items()}

    def loss(step: int) -> float:
        model.zero_grad(set_to_none=True)
        return accumulate(model, micro, pad_id, len(examples))

    def advance() -> None:
        with torch.no_grad():
            for p in params.values():
                if p.grad is not None:
                    p -= lr * p.grad

    try:
        result = keep_best(loss, advance, validate, current, lambda weights: weights, steps, schedule(steps),
                           lr=lr, trainable_parameters=sum(p.numel() for p in params.values()),
                           progress=progress, desc=desc, lr_name="the lr")
    finally:
        restore_base(model, base)
    changed_only(result, base)
    result.seconds = time.perf_counter() - start
    return result
