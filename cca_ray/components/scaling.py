"""Scale component activations in a live forward pass with hooks (the intervention DCM learns masks
through): differentiable w.r.t. the scales, last position only by default, KV-cache friendly."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from cca_ray.components.adapters import KINDS, Site, adapter_for
from cca_ray.components.space import ComponentSpace, component_space, decoder_layers

_SEQ_DIM = {"flat": -2, "bshd": -3, "bhsd": -2}


def _factor(row: torch.Tensor, site: Site, unit: int) -> torch.Tensor:
    """One layer's per-component scales reshaped to broadcast against one position of the site tensor."""
    if site.layout == "flat":
        return row.repeat_interleave(unit)  # [units * unit] against [..., 1, units * unit]
    if site.layout == "bshd":
        return row[:, None]  # [heads, 1] against [b, 1, heads, d]
    return row[:, None, None]  # bhsd: [heads, 1, 1] against [b, heads, 1, d]


def _apply(x: torch.Tensor, factor: torch.Tensor, seq_dim: int, last_only: bool) -> torch.Tensor:
    """x * factor, at the last sequence position only when last_only (out of place, so autograd sees it;
    the product is taken in the scale's precision, so a bf16 model does not round 2*m to bf16 first)."""
    factor = factor.to(x.device)
    if not last_only:
        return (x * factor).to(x.dtype)
    n = x.size(seq_dim)
    last = (x.narrow(seq_dim, n - 1, 1) * factor).to(x.dtype)
    return torch.cat([x.narrow(seq_dim, 0, n - 1), last], dim=seq_dim)


def _scaler(
    scale: torch.Tensor, layer: int, site: Site, unit: int, last_only: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function tensor -> scaled tensor for one (layer, kind); the factor is rebuilt on every call so
    each forward gets a fresh autograd graph back to `scale`."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return _apply(x, _factor(scale[layer], site, unit), _SEQ_DIM[site.layout], last_only)

    return fn


def _install(
    module: torch.nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.utils.hooks.RemovableHandle:
    """Hook `fn` onto the module's input (site.pre) or output."""
    if site.pre:
        return module.register_forward_pre_hook(lambda _m, args: (fn(args[0]), *args[1:]))
    return module.register_forward_hook(lambda _m, _args, out: fn(out))


def _check_scales(scales: Mapping[str, torch.Tensor], space: ComponentSpace) -> None:
    """Reject unknown kinds and wrongly shaped tensors before any hook is installed."""
    for kind, tensor in scales.items():
        if kind not in KINDS:
            raise ValueError(f"scales has unknown kind {kind!r}; expected a subset of {KINDS}")
        if tuple(tensor.shape) != space.shape(kind):
            raise ValueError(
                f"scales[{kind!r}] has shape {tuple(tensor.shape)}, expected {space.shape(kind)} "
                f"(n_layers, components per layer) for {space.model_type}"
            )


@contextmanager
def scaled(
    model: torch.nn.Module,
    scales: Mapping[str, torch.Tensor],
    architecture: str | None = None,
    last_position_only: bool = True,
) -> Iterator[ComponentSpace]:
    """Inside the block, multiply the activation of component (layer, kind, i) by scales[kind][layer, i]
    (kinds absent from `scales` are untouched); only at the last position of each forward when
    last_position_only (inputs left-padded; a one-token cached step is its own last position).
    Yields the model's ComponentSpace; hooks are removed on exit, exceptions included."""
    adapter = adapter_for(model, architecture)
    space = component_space(model, architecture)
    _check_scales(scales, space)
    layers = decoder_layers(model, adapter)
    handles = []
    try:
        for kind, scale in scales.items():
            site = adapter.sites[kind]
            for layer in range(space.n_layers):
                module = layers[layer].get_submodule(site.module)
                fn = _scaler(scale, layer, site, space.unit(kind), last_position_only)
                handles.append(_install(module, site, fn))
        yield space
    finally:
        for handle in handles:
            handle.remove()
