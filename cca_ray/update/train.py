"""Targeted update: full-batch logit-difference gradient on the selected rows only (plain gradient
descent as in the paper, Adam as an option), run through the keep-best loop (`loop.keep_best`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from cca_ray.dcm.batches import Example, full_logits, logit_difference
from cca_ray.sampling.weights import WeightUpdate
from cca_ray.update.loop import TrainResult, UpdateError, keep_best, schedule
from cca_ray.update.rows import RowDeltas


def micro_batches(examples: list[Example], size: int) -> list[list[Example]]:
    """The examples sorted by length (less padding) and cut into micro-batches of ``size``; one
    full-batch gradient step accumulates over all of them."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    return [[examples[i] for i in order[s : s + size]] for s in range(0, len(order), size)]


def logit_loss(model, batch: list[Example], pad_id: int, n_examples: int) -> torch.Tensor:
    """-sum of the batch's logit differences / all examples: the micro-batch losses add up to -mean."""
    return -logit_difference(full_logits(model, batch, pad_id), batch).sum() / n_examples


def accumulate(model, micro: list[list[Example]], pad_id: int, n_examples: int) -> float:
    """Forward and backward over every micro-batch (the gradients add up to the full batch's); the loss."""
    total = 0.0
    for batch in micro:
        loss = logit_loss(model, batch, pad_id, n_examples)
        loss.backward()
        total += loss.item()
    return total


@contextmanager
def checkpointing(model, enabled: bool = True) -> Iterator[None]:
    """Activation checkpointing of the decoder layers while inside: each layer keeps only its input for
    the backward and recomputes the rest there (one more forward per step, a lower peak: the saved
    activations shrink from every layer's to one layer's). Hugging Face checkpoints a layer only when it
    is in training mode, so just the layers are switched to training mode (their attention and
    dropout modules stay as they were: the same numbers as without), non-reentrant, so the gradients
    reach the row deltas' hooks with the base weights and the inputs frozen. Restored on exit."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    was_on, hooked = model.is_gradient_checkpointing, bool(getattr(model, "_require_grads_hooks", None))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not hooked:
        model.disable_input_require_grads()  # non-reentrant needs no input that requires grad
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    modes = [m.training for m in layers]
    for m in layers:
        m.training = True  # the layer's own flag only, not its children's (no dropout turned on)
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.training = mode
        if not was_on:
            model.gradient_checkpointing_disable()


def check_inputs(examples: list[Example], n_rows: int) -> None:
    """Raise UpdateError when there is nothing to train on or nothing to train."""
    if not examples:
        raise UpdateError("the update got no localisation examples")
    if n_rows == 0:
        raise UpdateError("no weight rows selected for the update: check update.kinds against the mask")


def targeted_update(model, deltas: RowDeltas, examples: list[Example], pad_id: int,
                    validate: Callable[[WeightUpdate], float], lr: float = 1e-4, steps: int = 50,
                    optimizer: str = "sgd", micro_batch_size: int = 8, gradient_checkpointing: bool = False,
                    progress: bool = True, desc: str = "update") -> TrainResult[list[torch.Tensor]]:
    """Train ``deltas`` (attached to ``model``) on -mean logit difference over all examples; the
    snapshots are the row deltas (`RowDeltas.snapshot`).

    ``validate(weights)`` scores the model as it stands (deltas attached) on the validation set;
    ``weights`` are the trained parameters' selected rows as they stand (`Rows`: all a separate
    engine needs, `RowDeltas.merged_rows`).
    ``gradient_checkpointing`` recomputes the decoder layers' activations in the backward
    (`checkpointing`): the same deltas, a lower peak memory, a slower step.
    """
    check_inputs(examples, deltas.parameter_count())
    if gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise UpdateError(f"{type(model).__name__} does not support gradient checkpointing: set "
                          "update.gradient_checkpointing to false")
    start = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(deltas.parameters(), lr=lr) if optimizer == "adam" else None
    micro = micro_batches(examples, micro_batch_size)

    def loss(step: int) -> float:
        model.zero_grad(set_to_none=True)
        deltas.zero_grad(set_to_none=True)
        with checkpointing(model, gradient_checkpointing):
            return accumulate(model, micro, pad_id, len(examples))

    def advance() -> None:
        with torch.no_grad():
            if opt is not None:
                opt.step()
            else:
                for d in deltas.deltas:
                    d -= lr * d.grad

    with deltas.attached():
        result = keep_best(loss, advance, validate, deltas.snapshot, lambda _: deltas.merged_rows(), steps,
                           schedule(steps), lr=lr, trainable_parameters=deltas.parameter_count(),
                           progress=progress, desc=desc)
    result.seconds = time.perf_counter() - start
    return result
