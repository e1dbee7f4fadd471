"""The one table of supported architectures: where each component kind's activation lives and which
weight rows produce it. Every architecture difference the stages care about is a field of a row here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cca_ray.errors import UserError

KINDS: tuple[str, ...] = ("q", "k", "v", "mlp")
HEAD_KINDS: tuple[str, ...] = ("q", "k", "v")

# Tensor layouts at a hook site. "flat": [..., seq, units * unit_size] (a Linear's output or input);
# "bshd": [batch, seq, heads, head_dim]; "bhsd": [batch, heads, seq, head_dim].
LAYOUTS: tuple[str, ...] = ("flat", "bshd", "bhsd")


class UnsupportedArchitecture(UserError, ValueError):
    """A model_type with no row in the adapter table."""


@dataclass(frozen=True)
class Site:
    """Where one kind's activation is scaled: a module under each decoder layer, the layout of the
    tensor there, and whether it is the module's input (forward pre-hook) rather than its output."""

    module: str
    layout: str = "flat"
    pre: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"Site {self.module!r}: layout {self.layout!r} is not one of {LAYOUTS}")


@dataclass(frozen=True)
class Adapter:
    """One row of the table. `layers` is the attribute path of the decoder-layer list from the
    top-level model; `sites` and `rows` map each kind to a module path relative to one decoder layer:
    the activation the masks scale, and the nn.Linear whose weight rows the targeted update touches."""

    model_type: str
    sites: Mapping[str, Site]
    rows: Mapping[str, str]
    layers: str = "model.layers"

    def __post_init__(self) -> None:
        for field in ("sites", "rows"):
            table = getattr(self, field)
            if set(table) != set(KINDS):
                raise ValueError(f"Adapter {self.model_type!r}: {field} must cover exactly {KINDS}")
            object.__setattr__(self, field, MappingProxyType(dict(table)))


_ROWS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "mlp": "mlp.up_proj"}
_MLP = Site("mlp.down_proj", "flat", pre=True)  # entry j of down_proj's input is act(gate)_j * up_j
_V = Site("self_attn.v_proj")


def _plain(model_type: str, layers: str = "model.layers") -> Adapter:
    """Llama-style: no per-head norm, so the q/k/v projections' outputs are the head activations."""
    sites = {"q": Site("self_attn.q_proj"), "k": Site("self_attn.k_proj"), "v": _V, "mlp": _MLP}
    return Adapter(model_type, sites, _ROWS, layers)


def _qk_norm(model_type: str, layout: str, layers: str = "model.layers") -> Adapter:
    """Architectures with q_norm/k_norm: scale after the norm, which would otherwise undo the scale
    (per-head norm: qwen3, gemma3) or spread it over all heads (full-width norm: olmo2/3)."""
    q, k = Site("self_attn.q_norm", layout), Site("self_attn.k_norm", layout)
    sites = {"q": q, "k": k, "v": _V, "mlp": _MLP}
    return Adapter(model_type, sites, _ROWS, layers)


ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        _plain("llama"),
        _plain("mistral"),
        _plain("qwen2"),
        _plain("gemma"),
        _plain("gemma2"),
        _qk_norm("qwen3", "bshd"),  # q_norm(q_proj(x).view(b, s, h, d))
        _qk_norm("gemma3_text", "bhsd"),  # Gemma3ForCausalLM: q_norm after .transpose(1, 2)
        _qk_norm("gemma3", "bhsd", layers="model.language_model.layers"),  # Gemma3ForConditionalGeneration
        _qk_norm("olmo2", "flat"),  # q_norm(q_proj(x)) over all heads at once
        _qk_norm("olmo3", "flat"),
    )
}


def adapter_for(model_or_config: Any, architecture: str | None = None) -> Adapter:
    """The table row for a model (or its config); `architecture` overrides config.model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = architecture or getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported model_types: "
            f"{', '.join(sorted(ADAPTERS))}. "
            "To support it, add a row to ADAPTERS in cca_ray/components/adapters.py "
            "(where its q/k/v heads and MLP neurons live)."
        )
    return ADAPTERS[model_type]
