"""DCM (desiderata-based component masking): learn one mask value per Q/K/V head and MLP neuron,
applied at the intervention (last) position as activation * 2m, so that the model prefers the
desired over the undesired token with as few components as possible."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from cca_ray.components import KINDS, ComponentSpace, component_space, scaled
from cca_ray.dcm.batches import Example, PrefixCache, full_logits, logit_difference
from cca_ray.errors import UserError

log = logging.getLogger("cca_ray")


class DCMError(UserError, RuntimeError):
    """DCM cannot give a usable mask (NaN loss, nothing selected, no examples)."""


def selected_components(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The components a mask selects: round(m) == 1, i.e. m > 0.5 (the one threshold)."""
    return {k: m > 0.5 for k, m in masks.items()}


@dataclass
class DCMResult:
    masks: dict[str, torch.Tensor]  # kind -> [layers, count] values in [0, 1]
    space: ComponentSpace
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    stopped_early: bool = False
    seconds: float = 0.0

    @property
    def selected(self) -> dict[str, torch.Tensor]:
        return selected_components(self.masks)

    def summary(self) -> dict:
        sel = self.selected
        per_layer = {k: s.sum(dim=1).tolist() for k, s in sel.items()}
        count = int(sum(int(s.sum()) for s in sel.values()))
        return {"components_selected": count, "components_total": self.space.total,
                "components_fraction": count / self.space.total,
                "selected_per_kind": {k: int(s.sum()) for k, s in sel.items()},
                "selected_per_layer": per_layer, "epochs_run": self.epochs_run,
                "stopped_early": self.stopped_early, "seconds": round(self.seconds, 2),
                "history": self.history}


def learn_mask(model, examples: list[Example], pad_id: int, lam: float = 0.01, lr: float = 5e-3,
               epochs: int = 50, batch_size: int = 8, lr_step_epochs: int = 5, lr_gamma: float = 0.9,
               early_stop_fraction: float = 0.2, seed: int = 0, kv_reuse: bool = True,
               architecture: str | None = None, progress: bool = True) -> DCMResult:
    """Adam on the masks (init 1, clamped to [0, 1] after every step) with loss
    -mean(logit diff) + lam * sum(m); StepLR per epoch; early stop when the selected count has
    not changed for early_stop_fraction of an epoch's batches (never while all are selected)."""
    if not examples:
        raise DCMError("DCM got no localisation examples; check the localisation stage's counts")
    start = time.perf_counter()
    space = component_space(model, architecture)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    masks = {k: torch.ones(space.shape(k), device=device, requires_grad=True) for k in KINDS}
    optimizer = torch.optim.Adam(list(masks.values()), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step_epochs, gamma=lr_gamma)
    cache = PrefixCache(model, examples, pad_id) if kv_reuse else None
    rng = random.Random(seed)
    order = list(range(len(examples)))
    n_batches = math.ceil(len(order) / batch_size)
    patience = max(1, math.ceil(early_stop_fraction * n_batches))
    result = DCMResult({}, space)
    last_count = space.total
    bar = tqdm(range(epochs), desc="DCM", unit="epoch", disable=not progress)
    for epoch in bar:
        rng.shuffle(order)
        unchanged, losses = 0, []
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch = [examples[i] for i in idx]
            with scaled(model, {k: 2 * m for k, m in masks.items()}, architecture):
                logits = cache.logits(idx) if cache else full_logits(model, batch, pad_id)
            diff = logit_difference(logits, batch)
            loss = -diff.mean() + lam * sum(m.sum() for m in masks.values())
            if not torch.isfinite(loss):
                raise DCMError(f"DCM loss is {loss.item()} at epoch {epoch}, batch {b}: lower dcm.lr "
                               f"(now {lr}) or check the model's dtype (float32 is safest)")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for m in masks.values():
                    m.clamp_(0.0, 1.0)
            losses.append(loss.item())
            count = int(sum(int(s.sum()) for s in selected_components(masks).values()))
            unchanged = unchanged + 1 if count == last_count else 0
            last_count = count
            if unchanged >= patience and count != space.total:
                break
        scheduler.step()
        result.history.append({"epoch": epoch, "loss": sum(losses) / len(losses), "selected": last_count})
        bar.set_postfix(loss=f"{result.history[-1]['loss']:.3f}", selected=last_count)
        log.info("DCM epoch %d: loss %.4f, %d of %d selected", epoch, result.history[-1]["loss"], last_count,
                 space.total)
        result.epochs_run = epoch + 1
        if unchanged >= patience and last_count != space.total:
            result.stopped_early = True
            break
    result.masks = {k: m.detach().clamp(0, 1).cpu() for k, m in masks.items()}
    result.seconds = time.perf_counter() - start
    if last_count == 0:
        raise DCMError(f"the mask selects no component of {space.total} (lambda {lam}): lower "
                       f"dcm.lambda (e.g. {lam / 3:.2g}) so the logit difference outweighs the penalty")
    return result
