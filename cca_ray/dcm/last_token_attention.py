"""Attention of one new token over a cached prefix that needs no gradient, for PrefixCache.logits.

Run through HF's own cache, the new token's key is concatenated to the cached keys, so autograd
takes the whole [B, heads, prefix, dim] key and value tensors as inputs and the backward computes,
sums over GQA groups and throws away gradients for every cached position: at prefix 1024 that was
about half of a DCM step. This attention (registered as an HF attention implementation, switched on
only inside `cached_prefix`) takes the cached parts as constants from the side: the prompt all
prefixes share, broadcast over the batch without a copy, and each example's own left-padded part,
then the new token's own key and value, which carry the gradient. Scores and softmax are those of
the implementation it stands in for (scaling; Gemma-2's logit soft-capping where that implementation
applies it: eager and flash do, HF's sdpa ignores it); sliding windows are already applied to what
the cache holds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "cca_cached_prefix"


@dataclass
class CachedLayer:
    """One layer's cached keys/values: the shared part [1, kv_heads, P, dim] (or None) and the
    examples' own parts [B, kv_heads, W, dim], left-padded, ``valid`` [B, W] marking real positions."""

    shared: tuple[torch.Tensor, torch.Tensor] | None
    own_k: torch.Tensor
    own_v: torch.Tensor
    valid: torch.Tensor


@dataclass
class _Active:
    """The forward running inside cached_prefix(): its cached layers, and whether the implementation
    this one stands in for applies soft-capping (sdpa ignores it)."""

    layers: list[CachedLayer]
    softcap: bool


_ACTIVE = _Active([], True)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
              scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, heads, 1, dim]; key/value [B, kv_heads, 1, dim]: the new token's (no cache passed)."""
    cached = _ACTIVE.layers[module.layer_idx]
    b, heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError(f"cached-prefix attention scores one new token, got {q_len}")
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)  # query head h reads kv head h // groups
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    parts = []
    if cached.shared is not None:
        parts.append(torch.einsum("bkgd,kpd->bkgp", q, cached.shared[0][0]))
    parts.append(torch.einsum("bkgd,bkwd->bkgw", q, cached.own_k))
    parts.append(torch.einsum("bkgd,bkd->bkg", q, key[:, :, -1]).unsqueeze(-1))
    scores = torch.cat(parts, dim=-1).to(work) * (scaling if scaling is not None else dim ** -0.5)
    if softcap is not None and _ACTIVE.softcap:
        scores = torch.tanh(scores / softcap) * softcap
    n_shared, width = (parts[0].shape[-1] if cached.shared is not None else 0), cached.own_k.shape[2]
    hidden = torch.zeros(b, scores.shape[-1], dtype=torch.bool, device=scores.device)
    hidden[:, n_shared : n_shared + width] = ~cached.valid
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.einsum("bkgw,bkwd->bkgd", p[..., n_shared : n_shared + width], cached.own_v)
    out = out + p[..., -1:] * value[:, :, -1].unsqueeze(2)
    if cached.shared is not None:
        out = out + torch.einsum("bkgp,kpd->bkgd", p[..., :n_shared], cached.shared[1][0])
    return out.reshape(b, 1, heads, dim), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # one token, no cache: the mask is trivial


@contextlib.contextmanager
def cached_prefix(model, layers: list[CachedLayer]) -> Iterator[None]:
    """Inside: the model's attention reads these cached layers (call it with the new tokens only,
    their positions and no past_key_values); its attention implementation is restored after."""
    configs, todo = [], [model.config]
    while todo:  # the config and its sub-configs (a multimodal model's text config), each restored as it was
        c = todo.pop()
        configs.append((c, c._attn_implementation))
        todo += [getattr(c, k) for k in getattr(c, "sub_configs", {}) if getattr(c, k, None) is not None]
    _ACTIVE.layers = layers
    _ACTIVE.softcap = model.config._attn_implementation != "sdpa"  # as the model computes without the cache
    model.config._attn_implementation = NAME
    try:
        yield
    finally:
        for c, value in configs:
            c._attn_implementation_internal = value
        _ACTIVE.layers = []
