"""Components of a model (Q/K/V heads, MLP neurons), addressed as (layer, kind, index): which exist for an
architecture, which weight rows produce them, and how to scale them in a forward pass."""

from cca_ray.components.adapters import (
    ADAPTERS,
    KINDS,
    Adapter,
    Site,
    UnsupportedArchitecture,
    adapter_for,
)
from cca_ray.components.scaling import scaled
from cca_ray.components.space import (
    ComponentSpace,
    component_space,
    decoder_layers,
    param_name_rows,
    weight_rows,
)

__all__ = [
    "ADAPTERS",
    "KINDS",
    "Adapter",
    "ComponentSpace",
    "Site",
    "UnsupportedArchitecture",
    "adapter_for",
    "component_space",
    "decoder_layers",
    "param_name_rows",
    "scaled",
    "weight_rows",
]
