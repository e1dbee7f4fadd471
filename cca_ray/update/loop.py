"""The one keep-best loop every update runs (targeted, DeepSpeed, no-mask, fine-tuning): validate step 0
(the base model), train, validate at the schedule's marks and keep the best step (step 0 included) and,
beside it, the best step >= 1, so a null update still shows what training did."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from tqdm import tqdm

from cca_ray.errors import UserError
from cca_ray.sampling.weights import WeightUpdate

log = logging.getLogger("cca_ray")

S = TypeVar("S")  # a snapshot: row deltas (targeted update) or name -> weight (whole-parameter baselines)


class UpdateError(UserError, RuntimeError):
    """The update cannot go on (NaN loss, nothing to train)."""


def schedule(steps: int, eval_every: int | None = None) -> list[int]:
    """The validated steps: 0 (the base model), 2, 4, 6, 8, 10, then every 5 and the last step; with
    ``eval_every`` (the fine-tuning baselines), 0, every ``eval_every`` steps and the last step."""
    if eval_every is not None:
        return sorted(set(range(0, steps + 1, max(1, eval_every))) | {steps})
    marks = [0] + [s for s in (2, 4, 6, 8, 10) if s <= steps] + list(range(15, steps + 1, 5))
    return sorted(set(marks + [steps]))


@dataclass
class TrainResult(Generic[S]):
    """An update's outcome: the best validated step and its snapshot, the best step >= 1 and its
    snapshot, the snapshot after the last step, and one history record per step."""

    best_step: int
    best_val: float
    best: S  # the snapshot at the best step (step 0, the base model, included)
    best_updated_step: int | None = None  # the best validated step >= 1 (ties: the earlier)
    best_updated_val: float | None = None
    best_updated: S | None = None
    last: S | None = None  # after the last step (drift checks)
    history: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    changed_parameters: int | None = None  # entries of the base model `best` changes (whole-parameter runs)
    seconds: float = 0.0

    def observe(self, step: int, val: float, snapshot: Callable[[], S]) -> None:
        """Keep this validated step as the best (step 0 included) and/or the best step >= 1 if it
        beats them; ``snapshot`` gives the current state, taken at most once."""
        taken: list[S] = []

        def state() -> S:
            if not taken:
                taken.append(snapshot())
            return taken[0]

        if val > self.best_val:
            self.best_step, self.best_val, self.best = step, val, state()
        if step >= 1 and (self.best_updated_val is None or val > self.best_updated_val):
            self.best_updated_step, self.best_updated_val, self.best_updated = step, val, state()


def keep_best(loss: Callable[[int], float], advance: Callable[[], None],
              validate: Callable[[WeightUpdate], float], snapshot: Callable[[], S],
              weights: Callable[[S], WeightUpdate], steps: int, marks: Iterable[int], *, lr: float,
              trainable_parameters: int, progress: bool = True, desc: str = "update", what: str = "update",
              lr_name: str = "update.lr") -> TrainResult[S]:
    """Run ``steps`` training steps, validating step 0 and the steps in ``marks``.

    A step is ``loss(step)`` (the step's loss; gradients may be computed already), a finite check, then
    ``advance()`` (the rest of the step: backward where not done, the optimizer step), so a NaN never
    reaches the weights. At a validated step, ``snapshot()`` captures the trained state once and
    ``validate(weights(snapshot))`` scores it; the result keeps the snapshots of the best steps.
    """
    checks = set(marks)
    state = snapshot()
    val = validate(weights(state))
    result = TrainResult(0, val, state, trainable_parameters=trainable_parameters)
    result.history.append({"step": 0, "val_accuracy": val, "loss": None})
    last, last_step = state, 0
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step", disable=not progress)
    for step in bar:
        total = loss(step)
        if not torch.isfinite(torch.tensor(total)):
            raise UpdateError(f"{what} loss is {total} at step {step} (lr {lr}): lower {lr_name}; "
                              f"the best step so far was {result.best_step}")
        advance()
        record = {"step": step, "loss": total}
        if step in checks:
            state = snapshot()
            record["val_accuracy"] = validate(weights(state))
            result.observe(step, record["val_accuracy"], lambda state=state: state)
            last, last_step = state, step
            bar.set_postfix(loss=f"{total:.3f}", val=f"{record['val_accuracy']:.3f}")
            log.info("%s step %d: loss %.4f, val accuracy %.4f", desc, step, total, record["val_accuracy"])
        result.history.append(record)
    result.last = last if last_step == steps else snapshot()
    return result
