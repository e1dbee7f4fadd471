"""The random-component control: as many components of each kind as CCA's selection, drawn
uniformly over all layers with a seed, so a gain CCA shows can be told apart from any sparse update."""

from __future__ import annotations

import torch


def random_selection(selected: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same number of components of each kind as `selected`, drawn uniformly over all layers."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for kind, sel in selected.items():
        flat = torch.zeros(sel.numel(), dtype=torch.bool)
        flat[torch.randperm(sel.numel(), generator=g)[: int(sel.sum())]] = True
        out[kind] = flat.view_as(sel)
    return out
