"""Targeted update: full-batch logit-difference gradient on the selected rows only (plain gradient
descent as in the paper, Adam as an option), validated on GSym-Val at steps 2, 4, 6, 8, 10 and
then every 5; the best step (step 0, the base model, included) is kept, and beside it the best step
>= 1 (so a null update still shows what training did)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cca_ray.dcm.batches import Example, full_logits, logit_difference
from cca_ray.update.rows import RowDeltas

log = logging.getLogger("cca_ray")


class UpdateError(RuntimeError):
    """The update cannot go on (NaN loss, nothing to train)."""


def validation_steps(steps: int) -> list[int]:
    """0 (the base model), 2, 4, 6, 8, 10, then every 5 up to steps, and the last step."""
    marks = [0] + [s for s in (2, 4, 6, 8, 10) if s <= steps] + list(range(15, steps + 1, 5))
    return sorted(set(marks + [steps]))


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    """The examples sorted by length (less padding) and cut into micro-batches of ``size``; one
    full-batch gradient step accumulates over all of them."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    return [[examples[i] for i in order[s : s + size]] for s in range(0, len(order), size)]


@dataclass
class UpdateResult:
    best_step: int
    best_val: float
    best_deltas: list[torch.Tensor]
    history: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    seconds: float = 0.0
    last_deltas: list[torch.Tensor] = field(default_factory=list)  # after the last step (drift checks)
    best_updated_step: int | None = None  # the best validated step >= 1 (ties: the earlier)
    best_updated_val: float | None = None
    best_updated_deltas: list[torch.Tensor] = field(default_factory=list)

    def observe(self, step: int, val: float, snapshot: Callable[[], list[torch.Tensor]]) -> None:
        """Keep this validated step as the best (step 0 included) and/or the best step >= 1 if it
        beats them; ``snapshot`` gives the current deltas, taken at most once."""
        taken: list[list[torch.Tensor]] = []

        def deltas() -> list[torch.Tensor]:
            if not taken:
                taken.append(snapshot())
            return taken[0]

        if val > self.best_val:
            self.best_step, self.best_val, self.best_deltas = step, val, deltas()
        if step >= 1 and (self.best_updated_val is None or val > self.best_updated_val):
            self.best_updated_step, self.best_updated_val, self.best_updated_deltas = step, val, deltas()


def targeted_update(model, deltas: RowDeltas, examples: list[Example], pad_id: int,
                    validate: Callable[[dict[str, torch.Tensor]], float], lr: float = 1e-4, steps: int = 50,
                    optimizer: str = "sgd", micro_batch_size: int = 8, progress: bool = True,
                    desc: str = "update") -> UpdateResult:
    """Train ``deltas`` (attached to ``model``) on -mean logit difference over all examples.

    ``validate(weights)`` scores the model as it stands (deltas attached) on the validation set;
    ``weights`` are the current full weights of the trained parameters (for a separate engine).
    """
    if not examples:
        raise UpdateError("the update got no localisation examples")
    if deltas.parameter_count() == 0:
        raise UpdateError("no weight rows selected for the update: check update.kinds against the mask")
    start = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(deltas.parameters(), lr=lr) if optimizer == "adam" else None
    checks = set(validation_steps(steps))
    micro = micro_batches(examples, micro_batch_size)
    history: list[dict] = []
    with deltas.attached():
        best_val = validate(deltas.merged_weights())
        best = UpdateResult(0, best_val, deltas.snapshot(), trainable_parameters=deltas.parameter_count())
        history.append({"step": 0, "val_accuracy": best_val, "loss": None})
        bar = tqdm(range(1, steps + 1), desc=desc, unit="step", disable=not progress)
        for step in bar:
            model.zero_grad(set_to_none=True)
            deltas.zero_grad(set_to_none=True)
            total = 0.0
            for batch in micro:
                diff = logit_difference(full_logits(model, batch, pad_id), batch)
                loss = -diff.sum() / len(examples)
                loss.backward()
                total += loss.item()
            if not torch.isfinite(torch.tensor(total)):
                raise UpdateError(f"update loss is {total} at step {step} (lr {lr}): lower update.lr; "
                                  f"the best step so far was {best.best_step}")
            with torch.no_grad():
                if opt is not None:
                    opt.step()
                else:
                    for d in deltas.deltas:
                        d -= lr * d.grad
            record = {"step": step, "loss": total}
            if step in checks:
                record["val_accuracy"] = validate(deltas.merged_weights())
                best.observe(step, record["val_accuracy"], deltas.snapshot)
                bar.set_postfix(loss=f"{total:.3f}", val=f"{record['val_accuracy']:.3f}")
                log.info("%s step %d: loss %.4f, val accuracy %.4f", desc, step, total,
                         record["val_accuracy"])
            history.append(record)
    best.history = history
    best.last_deltas = deltas.snapshot()
    best.seconds = time.perf_counter() - start
    return best
