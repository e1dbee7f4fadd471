"""The sparse delta: only the changed rows (their new values, not a difference, so applying it is
exact), saved as safetensors; apply_delta rebuilds the updated model bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cca_ray.io import atomic_dir, write_safetensors


def save_delta(rows: dict[str, torch.Tensor], values: dict[str, torch.Tensor], path: str | Path,
               base: str, extra: dict | None = None) -> Path:
    """rows/values per parameter name -> one safetensors file with the base model named inside."""
    path = Path(path)
    tensors = {}
    for name, r in rows.items():
        tensors[f"{name}::rows"] = r.to(torch.int64).contiguous()
        tensors[f"{name}::values"] = values[name].contiguous()
    meta = {"format": "cca-ray-row-delta/1", "base": base, "extra": json.dumps(extra or {})}
    return write_safetensors(tensors, path, metadata=meta)


def load_delta(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """parameter name -> (rows, new values)."""
    tensors = load_file(str(path))
    names = sorted({k.rsplit("::", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}::rows"], tensors[f"{n}::values"]) for n in names}


def apply_delta_to(model, delta: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Overwrite the delta's rows in the model; returns how many weight values it set."""
    params = dict(model.named_parameters())
    missing = [n for n in delta if n not in params]
    if missing:
        raise ValueError(f"the delta names parameters the base model lacks: {missing[:3]} "
                         f"(was it made for another base model?)")
    count = 0
    with torch.no_grad():
        for name, (rows, values) in delta.items():
            w = params[name]
            fits = (rows.dim() == 1 and values.shape[0] == rows.numel() and values.shape[1:] == w.shape[1:]
                    and (rows.numel() == 0 or (int(rows.min()) >= 0 and int(rows.max()) < w.shape[0])))
            if not fits:
                raise ValueError(f"delta rows for {name} do not fit its shape {tuple(w.shape)} "
                                 f"({rows.numel()} rows, values {tuple(values.shape)})")
            w[rows] = values.to(w.dtype)
            count += values.numel()
    return count


def apply_delta(base: str | Path, delta_path: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Load the base model, write the delta's rows, save an HF folder (safetensors) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    apply_delta_to(model, load_delta(delta_path))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    return Path(out)
