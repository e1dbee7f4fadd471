"""What a weight sync sends: per HF parameter, a whole new weight, only the rows a row update changed
(`Rows`), a LoRA product (`LowRank`), or None (back to the checkpoint's). A whole weight, a LoRA
product (checkpoint + product) and None say all of the weight, so syncing them again changes nothing;
`Rows` set their rows and leave the others as the engine holds them (a trainer's validations resend
the same rows). A row update of k rows sends k rows, not the fused q/k/v or gate/up matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Rows:
    """These rows of the weight are ``values`` ([k, in]); its other rows stay as they are."""

    index: torch.Tensor
    values: torch.Tensor

    def detached(self) -> Rows:
        return Rows(self.index.detach().to("cpu").clone(), self.values.detach().to("cpu").clone())


@dataclass(frozen=True)
class LowRank:
    """The weight is the checkpoint's plus ``scale * b @ a`` (a LoRA adapter: a [r, in], b [out, r])."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def detached(self) -> LowRank:
        return LowRank(self.a.detach().to("cpu").clone(), self.b.detach().to("cpu").clone(), self.scale)


Entry = Union[torch.Tensor, Rows, LowRank, None]  # noqa: UP007 (a runtime alias)
WeightUpdate = dict[str, Entry]  # HF parameter name -> what it is now


def detached(update: WeightUpdate) -> WeightUpdate:
    """A CPU copy of the update that later training steps cannot change."""
    return {n: (e.detach().to("cpu").clone() if isinstance(e, torch.Tensor) else
                e.detached() if e is not None else None) for n, e in update.items()}


def combine(old: Entry, new: Entry) -> Entry:
    """One entry for ``old`` then ``new`` synced: rows on rows keep both (the new values win where
    they meet); anything else says the whole weight, so ``new`` alone."""
    if not (isinstance(old, Rows) and isinstance(new, Rows)):
        return new
    keep = ~torch.isin(old.index, new.index)
    return Rows(torch.cat([old.index[keep], new.index]), torch.cat([old.values[keep], new.values]))


def payload_bytes(update: WeightUpdate) -> int:
    """Bytes of tensor data the update carries (what a sync sends, before framing)."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    total = 0
    for e in update.values():
        if isinstance(e, torch.Tensor):
            total += size(e)
        elif isinstance(e, Rows):
            total += size(e.index) + size(e.values)
        elif isinstance(e, LowRank):
            total += size(e.a) + size(e.b)
    return total


def materialise(entry: Entry, base: torch.Tensor) -> torch.Tensor:
    """The whole weight after syncing ``entry`` onto ``base``: for Rows, the weight as it was; for a
    LowRank product and None, the checkpoint's."""
    if entry is None:
        return base
    if isinstance(entry, torch.Tensor):
        return entry.to(base.dtype)
    out = base.clone()
    if isinstance(entry, Rows):
        out[entry.index.to(out.device)] = entry.values.to(out.device, out.dtype)
    else:
        out += (entry.scale * (entry.b.float() @ entry.a.float())).to(out.device, out.dtype)
    return out


def encode(t: torch.Tensor) -> tuple[bytes, list[int], str]:
    """A tensor as (raw bytes, shape, dtype name): what crosses vLLM's RPC (any dtype, bf16 included)."""
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", list(t.shape), str(t.dtype)


def decode(blob: tuple[bytes, list[int], str]) -> torch.Tensor:
    data, shape, dtype = blob
    kind = getattr(torch, dtype.split(".")[-1])
    if not data:
        return torch.empty(shape, dtype=kind)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(kind).view(*shape)
