"""Batches of localisation prefixes for last-position scoring, two exact ways: the full
left-padded prefix every time, or a KV cache of the prefix minus its last token computed once
(masks act on the last position only, so the cached part never depends on them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


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


class PrefixCache:
    """Per-example KV tensors of prefix[:-1], computed once without grad, batched on demand.
    Sliding-window layers (Gemma-2/3, Mistral, OLMo-3) store at most their window, as in generate()."""

    def __init__(self, model, examples: list[Example], pad_id: int, batch_size: int = 16):
        if any(len(e.ids) < 2 for e in examples):
            raise ValueError("KV reuse needs prefixes of at least 2 tokens")
        self.model, self.pad_id = model, pad_id
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(examples)  # type: ignore
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        device = next(model.parameters()).device
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                ids, mask = left_pad([examples[i].ids[:-1] for i in chunk], pad_id)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
                layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
                for r, i in enumerate(chunk):
                    n = len(examples[i].ids) - 1
                    self.kv[i] = [(k[r : r + 1, :, -n:].clone(), v[r : r + 1, :, -n:].clone())
                                  for k, v in layers]
        self.examples = examples

    def logits(self, indices: list[int]) -> torch.Tensor:
        """Last-position logits [B, V] for these examples: only the last token is recomputed."""
        lengths = [len(self.examples[i].ids) - 1 for i in indices]
        width = max(lengths)
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(self.kv[indices[0]])):
            k0 = self.kv[indices[0]][layer][0]
            shape = (len(indices), k0.shape[1], width, k0.shape[-1])
            ks, vs = k0.new_empty(shape), k0.new_empty(shape)  # one copy per layer, no pad + cat
            for r, i in enumerate(indices):
                k, v = self.kv[i][layer]
                # a sliding-window layer keeps only its last window-1 positions (fewer than n): the rest
                # is padding here; update() below keeps the window, and the mask offset skips the rest
                start = width - k.shape[-2]
                ks[r, :, start:], vs[r, :, start:] = k[0], v[0]
                ks[r, :, :start], vs[r, :, :start] = 0, 0  # masked, but must be finite (0 * nan = nan)
            cache.update(ks, vs, layer)
        mask = torch.zeros((len(indices), width + 1), dtype=torch.long)
        for r, n in enumerate(lengths):
            mask[r, width - n:] = 1
        device = next(self.model.parameters()).device
        last = torch.tensor([[self.examples[i].ids[-1]] for i in indices], device=device)
        positions = torch.tensor([[n] for n in lengths], device=device)
        out = self.model(input_ids=last, attention_mask=mask.to(device), position_ids=positions,
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float()


def logit_difference(logits: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """Per-example logit[desired] - logit[undesired] (gathered row by row, not a B x B matrix)."""
    rows = torch.arange(len(examples), device=logits.device)
    desired = torch.tensor([e.desired for e in examples], device=logits.device)
    undesired = torch.tensor([e.undesired for e in examples], device=logits.device)
    return logits[rows, desired] - logits[rows, undesired]
