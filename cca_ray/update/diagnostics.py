"""Pivot-level diagnostics of an update: at each pivot's intervention position, the logit difference
logit[desired] - logit[undesired] of the base and the updated model, on the train pivots and on the
held-out ones, to tell "update too weak" (train pivots not flipped) from "does not transfer"
(train pivots flipped, held-out ones not)."""

from __future__ import annotations

import torch

from cca_ray.dcm.batches import Example, full_logits, logit_difference
from cca_ray.update.rows import RowDeltas


def logit_differences(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """Per-example logit[desired] - logit[undesired] at the last prefix position, in input order
    (batched by length, no grad), on the CPU."""
    out = torch.zeros(len(examples))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = [examples[i] for i in chunk]
            out[chunk] = logit_difference(full_logits(model, batch, pad_id), batch).cpu()
    return out


def pivot_stats(diffs: torch.Tensor, base: torch.Tensor) -> dict:
    """Mean logit difference, the share where desired beats undesired, and the flip rate: among the
    pivots where the base had undesired >= desired (``base_wrong``), the share desired now beats."""
    n, wrong = len(diffs), base <= 0
    return {"n": n, "mean_logit_diff": diffs.mean().item() if n else None,
            "desired_wins": (diffs > 0).float().mean().item() if n else None,
            "base_wrong": int(wrong.sum()),
            "flip_rate": (diffs[wrong] > 0).float().mean().item() if wrong.any() else None}


def pivot_diagnostics(model, rows: dict[str, torch.Tensor], states: dict[str, list[torch.Tensor]],
                      sets: dict[str, list[Example]], pad_id: int, batch_size: int = 8) -> dict:
    """{"base": {set: stats}, state: {set: stats}, ...}: the base model and the model with each state's
    row deltas added (hooks; the model itself is not changed) on each pivot set."""
    base = {name: logit_differences(model, ex, pad_id, batch_size) for name, ex in sets.items()}
    out = {"base": {name: pivot_stats(d, d) for name, d in base.items()}}
    deltas = RowDeltas(model, rows)
    measured: dict[int, dict] = {}  # the same deltas (best step = best updated step) are measured once
    for state, values in states.items():
        if id(values) not in measured:
            deltas.load(values)
            with deltas.attached():
                measured[id(values)] = {
                    name: pivot_stats(logit_differences(model, ex, pad_id, batch_size), base[name])
                    for name, ex in sets.items()}
        out[state] = measured[id(values)]
    return out
