"""From learned node scores to a circuit (issue 18): a k_coef controller for the mask training, a
bisection over the nodes the learned mask kept on calibrated loss (the logit's scale and shift
fitted on validation pairs, the scale capped so that a weak circuit cannot pass by amplification),
and a greedy cleanup (lowest tau first) confirmed on validation pairs, which is kept only if the
cleaned circuit still passes on held-out pairs (cleanup on validation overfits at small sizes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class KCoefController:
    """Raises the node penalty while the task loss (an EMA of it) is below ``goal`` and lowers it while
    above, multiplicatively by exp(+-rate) per step, within [low, high]: the learned mask settles where
    the task loss is about ``goal`` instead of collapsing (penalty too high) or keeping hundreds of
    nodes (too low)."""

    k_coef: float
    goal: float
    low: float = 1e-6
    high: float = 1e-2
    rate: float = 0.02
    smoothing: float = 0.9
    ema: float | None = None

    def update(self, task_loss: float) -> float:
        """Observe one step's task loss; the k_coef for the next step."""
        ema = self.ema
        self.ema = task_loss if ema is None else self.smoothing * ema + (1 - self.smoothing) * task_loss
        step = -self.rate if self.ema > self.goal else self.rate
        self.k_coef = min(self.high, max(self.low, self.k_coef * math.exp(step)))
        return self.k_coef


def fit_scale_shift(d: torch.Tensor, label: torch.Tensor, steps: int = 16, scale: float | None = None,
                    shift: float = 0.0) -> tuple[float, float]:
    """Scale and shift of the binary logit ``d`` minimising the task loss, by LBFGS (`steps`
    iterations); with ``scale`` given, only the shift is fitted (from ``shift``)."""
    params = torch.tensor([1.0, shift] if scale is None else [shift], requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a = params[0] if scale is None else scale
        loss = torch.nn.functional.softplus(-label * (a * d + params[-1])).mean()
        loss.backward()
        return loss

    opt.step(closure)
    fitted = params.detach()
    return (float(fitted[0]) if scale is None else scale), float(fitted[-1])


def calibrated_loss(d: torch.Tensor, label: torch.Tensor, max_scale: float,
                    steps: int = 16) -> tuple[float, float, float]:
    """(loss, scale, shift): the task loss of the binary logit ``d`` after a scale and shift fitted by
    LBFGS, the scale kept within [0, max_scale] (a shift alone is refitted at the bound)."""
    d = d.detach().float()
    scale, shift = fit_scale_shift(d, label, steps)
    if not 0.0 <= scale <= max_scale:
        scale, shift = fit_scale_shift(d, label, steps, scale=min(max(scale, 0.0), max_scale), shift=shift)
    loss = float(torch.nn.functional.softplus(-label * (scale * d + shift)).mean())
    return loss, scale, shift


def bisect_smallest(loss_of_k: Callable[[int], float], n: int, target: float) -> int | None:
    """Smallest k in [0, n] with loss_of_k(k) <= target, assuming the loss falls as k grows;
    None if even k = n misses the target."""
    if loss_of_k(n) > target:
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if loss_of_k(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def bisect_kept(loss_of_k: Callable[[int], float], n_kept: int, target: float) -> int | None:
    """Smallest k in [1, n_kept] with loss_of_k(k) <= target (the top-k nodes by tau among those the
    learned mask kept), assuming the loss falls as k grows; None if the learned mask itself misses.
    The whole model is never needed to reach the target."""
    if n_kept < 1:
        return None
    k = bisect_smallest(lambda j: loss_of_k(j + 1), n_kept - 1, target)
    return None if k is None else k + 1


Node = tuple[str, int]  # (location, channel)


def greedy_cleanup(nodes: list[Node], passes: Callable[[list[Node]], bool]) -> list[Node]:
    """Drop nodes one at a time, lowest tau first (``nodes`` in descending tau), keeping each removal
    after which ``passes(circuit)`` (the validation check) still holds."""
    kept = list(nodes)
    for node in reversed(nodes):
        trial = [n for n in kept if n != node]
        if trial and passes(trial):
            kept = trial
    return kept


def confirmed_cleanup(nodes: list[Node], passes_val: Callable[[list[Node]], bool],
                      passes_test: Callable[[list[Node]], bool],
                      finish: Callable[[list[Node]], list[Node]] | None = None) -> tuple[list[Node], str]:
    """The cleaned circuit if it passes on held-out pairs, else the circuit before cleanup: never one
    that fails the held-out check when the uncleaned one passes. ``finish`` (e.g. the necessity
    repair) completes a circuit before that check, so a cleaned circuit the repair can make necessary
    is not reverted for lacking necessity. Returns (circuit, what happened)."""
    finish = finish or (lambda c: c)
    cleaned = greedy_cleanup(nodes, passes_val)
    if len(cleaned) == len(nodes):
        return finish(nodes), "nothing to remove"
    done = finish(cleaned)
    if passes_test(done):
        return done, f"removed {len(nodes) - len(cleaned)} nodes"
    return finish(nodes), f"reverted: the cleaned circuit ({len(done)} nodes) failed on held-out pairs"


def grow_until_necessary(circuit: list[Node], ablated_loss: Callable[[list[Node]], float],
                         ranked_others: Callable[[list[Node]], list[Node]], goal: float,
                         rounds: int = 4) -> tuple[list[Node], str]:
    """Make a sufficient circuit necessary when the model has another route for the task: while
    ablating the circuit leaves the task loss below ``goal``, add the fewest of the remaining nodes,
    in ``ranked_others(circuit)`` order (the route the model falls back on first), whose ablation with
    the circuit reaches the goal (bisection); a round that cannot reach it adds them all and ranks
    again. Returns (circuit, what happened); at most ``rounds`` rounds."""
    grown = list(circuit)
    for _ in range(rounds):
        if ablated_loss(grown) >= goal:
            break
        inside = set(grown)
        ranked = [n for n in ranked_others(grown) if n not in inside]
        if not ranked:
            break
        k = bisect_smallest(lambda j, g=grown, r=ranked: -ablated_loss(g + r[:j]), len(ranked), -goal)
        grown = grown + ranked[:len(ranked) if k is None else k]
    added = len(grown) - len(circuit)
    if ablated_loss(grown) < goal:
        return grown, f"other routes: {added} nodes added, still not necessary on validation pairs"
    return grown, f"other routes: {added} nodes added" if added else "necessary as selected"
