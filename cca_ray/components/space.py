"""Which components a model has (heads per kind, MLP neurons) and which weight rows produce each one,
addressed as (layer, kind, index)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cca_ray.components.adapters import HEAD_KINDS, KINDS, Adapter, adapter_for


@dataclass(frozen=True)
class ComponentSpace:
    """Sizes of the component grid of one model: per layer n_heads Q heads, n_kv_heads K and V heads
    (grouped-query aware) and d_ff MLP neurons."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int

    def count(self, kind: str) -> int:
        """Components of `kind` per layer."""
        counts = {"q": self.n_heads, "k": self.n_kv_heads, "v": self.n_kv_heads, "mlp": self.d_ff}
        if kind not in counts:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
        return counts[kind]

    @property
    def total(self) -> int:
        """All components of the model: n_layers * (n_heads + 2 * n_kv_heads + d_ff)."""
        return self.n_layers * sum(self.count(k) for k in KINDS)

    def shape(self, kind: str) -> tuple[int, int]:
        """Shape of a per-kind mask or scale tensor: (n_layers, count(kind))."""
        return (self.n_layers, self.count(kind))

    def unit(self, kind: str) -> int:
        """Width of one component in its projection's output: head_dim for heads, 1 for a neuron."""
        return self.head_dim if kind in HEAD_KINDS else 1


def decoder_layers(model: torch.nn.Module, adapter: Adapter) -> torch.nn.ModuleList:
    """The model's list of decoder layers, found by the adapter's path."""
    try:
        return model.get_submodule(adapter.layers)
    except AttributeError as err:
        raise ValueError(
            f"{type(model).__name__} has no {adapter.layers!r} (adapter {adapter.model_type!r}); pass the "
            "top-level *ForCausalLM model, or fix the row's `layers` path in the adapter table"
        ) from err


def component_space(model: torch.nn.Module, architecture: str | None = None) -> ComponentSpace:
    """Read the component grid from the model's (text) config and check it against the real modules."""
    adapter = adapter_for(model, architecture)
    config = model.config.get_text_config()
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    space = ComponentSpace(
        model_type=adapter.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_ff=config.intermediate_size,
    )
    layers = decoder_layers(model, adapter)
    if len(layers) != space.n_layers:
        raise ValueError(f"config says {space.n_layers} layers but {adapter.layers} holds {len(layers)}")
    for kind in KINDS:
        linear = layers[0].get_submodule(adapter.rows[kind])
        if linear.out_features != space.count(kind) * space.unit(kind):
            raise ValueError(
                f"{adapter.model_type}: {adapter.rows[kind]} has {linear.out_features} outputs, expected "
                f"{space.count(kind)} x {space.unit(kind)} for kind {kind!r}; the adapter row does not fit"
            )
    return space


def _check_address(space: ComponentSpace, layer: int, kind: str, index: int) -> None:
    """Fail with the bad coordinate named instead of silently slicing past the end."""
    if not 0 <= layer < space.n_layers:
        raise IndexError(f"layer {layer} out of range [0, {space.n_layers})")
    if not 0 <= index < space.count(kind):
        raise IndexError(f"{kind} index {index} out of range [0, {space.count(kind)})")


def weight_rows(
    model: torch.nn.Module, space: ComponentSpace, layer: int, kind: str, index: int
) -> tuple[torch.nn.Linear, slice]:
    """The Linear and the rows of its weight ([out, in] layout) that produce component (layer, kind,
    index): head h -> rows [h*head_dim, (h+1)*head_dim) of q/k/v_proj; neuron j -> row j of up_proj."""
    _check_address(space, layer, kind, index)
    adapter = adapter_for(model, space.model_type)
    linear = decoder_layers(model, adapter)[layer].get_submodule(adapter.rows[kind])
    unit = space.unit(kind)
    return linear, slice(index * unit, (index + 1) * unit)


def param_name_rows(
    model: torch.nn.Module, space: ComponentSpace, layer: int, kind: str, index: int
) -> tuple[str, slice]:
    """Like weight_rows, but the weight's name in model.named_parameters()
    (e.g. "model.layers.3.mlp.up_proj.weight")."""
    _check_address(space, layer, kind, index)
    adapter = adapter_for(model, space.model_type)
    unit = space.unit(kind)
    return f"{adapter.layers}.{layer}.{adapter.rows[kind]}.weight", slice(index * unit, (index + 1) * unit)
