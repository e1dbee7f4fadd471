"""Batches of localisation prefixes for last-position scoring, two exact ways: the full
left-padded prefix every time, or a KV cache of the prefix minus its last token computed once
(masks act on the last position only, so the cached part never depends on them), with the prompt
part all prefixes share stored once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cca_ray.dcm.last_token_attention import CachedLayer, cached_prefix


@dataclass
class Example:
    ids: list[int]  # the whole prefix; its last token is the intervention token
    desired: int
    undesired: int


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), padded on the left so every row's last token sits at index -1."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids, mask


def full_logits(model, examples: list[Example], pad_id: int) -> torch.Tensor:
    """Last-position logits [B, V] from a full forward over the left-padded prefixes."""
    ids, mask = left_pad([e.ids for e in examples], pad_id)
    device = next(model.parameters()).device
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float()


SHARE_MIN = 64  # a common prefix at least this long is cached once for all examples


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix every sequence starts with."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def sliding_window(model) -> int | None:
    """The smallest sliding window among the model's cache layers, or None when it has none."""
    windows = [layer.sliding_window for layer in DynamicCache(config=model.config).layers
               if getattr(layer, "sliding_window", None)]
    return min(windows) if windows else None


class PrefixCache:
    """KV tensors of every example's prefix[:-1], computed once without grad, batched on demand.

    Shared prompt: when all prefixes start with the same ``share_min`` or more tokens (the few-shot
    part of the prompt), that part's KV is computed and stored once, and each example stores only its
    own suffix's KV, computed against it; a batch puts them side by side. Otherwise (or when a
    sliding-window layer would cut the prefix) each example stores its whole KV. Sliding-window layers
    (Gemma-2/3, Mistral, OLMo-3) store at most their window, as in generate()."""

    def __init__(self, model, examples: list[Example], pad_id: int, batch_size: int = 16,
                 share_min: int = SHARE_MIN):
        if any(len(e.ids) < 2 for e in examples):
            raise ValueError("KV reuse needs prefixes of at least 2 tokens")
        self.model, self.pad_id, self.examples = model, pad_id, examples
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(examples)  # type: ignore
        self.shared: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        shared = common_prefix([e.ids[:-1] for e in examples])
        window = sliding_window(model)
        longest = max(len(e.ids) for e in examples)
        self.shared_length = shared if shared >= share_min and (window is None or longest < window) else 0
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        with torch.no_grad():
            if self.shared_length:
                self.shared = self._forward([examples[0].ids[:shared]], None)[0]
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                rows = self._forward([examples[i].ids[self.shared_length : -1] for i in chunk], self.shared)
                for i, kv in zip(chunk, rows, strict=True):
                    self.kv[i] = kv

    def _forward(self, seqs: list[list[int]], shared) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per sequence, per layer, the (k, v) of its own tokens [1, H, n, D]. Without ``shared``: from a
        left-padded forward. With it: right-padded after the shared KV (causal attention: a real token
        never sees the padding after it), positions continuing the shared part's."""
        device = next(self.model.parameters()).device
        if shared is None:
            ids, mask = left_pad(seqs, self.pad_id)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            return [[(k[r : r + 1, :, -len(s):].clone(), v[r : r + 1, :, -len(s):].clone())
                     for k, v in layers] for r, s in enumerate(seqs)]
        p, width = self.shared_length, max(len(s) for s in seqs)
        if width == 0:  # every prefix is the shared part: nothing of their own
            return [[(k[:, :, :0].clone(), v[:, :, :0].clone()) for k, v in shared] for _ in seqs]
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), p + width), dtype=torch.long)
        mask[:, :p] = 1
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, p : p + len(s)] = 1
        cache = DynamicCache(config=self.model.config)
        for layer, (k, v) in enumerate(shared):
            cache.update(k.expand(len(seqs), -1, -1, -1).contiguous(),
                         v.expand(len(seqs), -1, -1, -1).contiguous(), layer)
        positions = (p + torch.arange(width)).expand(len(seqs), -1)
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return [[(k[r : r + 1, :, p : p + len(s)].clone(), v[r : r + 1, :, p : p + len(s)].clone())
                 for k, v in layers] for r, s in enumerate(seqs)]

    def stored_bytes(self) -> int:
        """Bytes of KV held: the shared part once plus every example's own part."""
        parts = [kv for per_example in self.kv for kv in per_example] + list(self.shared or [])
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in parts)

    def logits(self, indices: list[int]) -> torch.Tensor:
        """Last-position logits [B, V] for these examples: only the last token is computed, its
        attention reading the cached parts as constants (`last_token_attention`): the shared prompt
        without a copy, each example's own part left-padded."""
        device = next(self.model.parameters()).device
        layers = []
        for layer in range(len(self.kv[indices[0]])):
            own = [self.kv[i][layer] for i in indices]
            width = max(k.shape[-2] for k, _ in own)
            k0 = own[0][0]
            shape = (len(indices), k0.shape[1], width, k0.shape[-1])
            ks, vs = k0.new_zeros(shape), k0.new_zeros(shape)  # padding: masked, but finite
            valid = torch.zeros((len(indices), width), dtype=torch.bool)
            for r, (k, v) in enumerate(own):
                # a sliding-window layer holds only its last window-1 positions: the rest is padding
                n = k.shape[-2]
                ks[r, :, width - n :], vs[r, :, width - n :] = k[0], v[0]
                valid[r, width - n :] = True
            shared = self.shared[layer] if self.shared is not None else None
            layers.append(CachedLayer(shared, ks, vs, valid.to(device)))
        last = torch.tensor([[self.examples[i].ids[-1]] for i in indices], device=device)
        positions = torch.tensor([[len(self.examples[i].ids) - 1] for i in indices], device=device)
        with cached_prefix(self.model, layers):
            out = self.model(input_ids=last, position_ids=positions, use_cache=False)
        return out.logits[:, -1, :].float()


def logit_difference(logits: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """Per-example logit[desired] - logit[undesired] (gathered row by row, not a B x B matrix)."""
    rows = torch.arange(len(examples), device=logits.device)
    desired = torch.tensor([e.desired for e in examples], device=logits.device)
    undesired = torch.tensor([e.undesired for e in examples], device=logits.device)
    return logits[rows, desired] - logits[rows, undesired]
