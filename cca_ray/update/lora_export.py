"""The CCA delta as a LoRA adapter in peft's format, so serving stacks (vLLM, peft) can load it. A row
update of k rows of a weight is exactly a rank-k product: B is one-hot on the changed rows, A holds
their changes, and alpha = r per module makes peft's scale 1, so nothing is approximated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cca_ray.io import atomic_dir, checkpoint_reader, write_safetensors
from cca_ray.update.delta import load_delta
from cca_ray.update.loop import UpdateError

PREFIX = "base_model.model."  # how peft names a wrapped causal LM's modules in adapter files
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest max_lora_rank vLLM accepts that serves an adapter of this rank (None: above 512)."""
    return next((r for r in VLLM_RANKS if r >= rank), None)


def lora_factors(rows: torch.Tensor, change: torch.Tensor,
                 out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [k, in], B [out, k]) with B @ A == the weight change (``change`` [k, in] on ``rows``)."""
    b = torch.zeros(out_features, len(rows), dtype=change.dtype)
    b[rows, torch.arange(len(rows))] = 1
    return change.contiguous(), b


def write_lora_adapter(delta: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       base_weight: Callable[[str], torch.Tensor], base_model: str, out: str | Path) -> dict:
    """A peft LoRA adapter folder (adapter_config.json, adapter_model.safetensors) for a row delta
    (parameter name -> (rows, new values)); ``base_weight(name)`` reads a base weight. Returns what
    it wrote: the modules, each one's rank (its changed rows) and the largest rank."""
    from peft import LoraConfig

    tensors, ranks = {}, {}
    for name, (rows, values) in sorted(delta.items()):
        if not name.endswith(".weight") or values.dim() != 2:
            raise UpdateError(f"{name}: a LoRA adapter holds changes of linear weights only")
        base = base_weight(name)
        change = values.to(torch.float32) - base[rows].to(torch.float32)
        keep = change.abs().sum(dim=1) > 0  # rows the update left as they were add no rank
        if not bool(keep.any()):
            continue
        a, b = lora_factors(rows[keep], change[keep], base.shape[0])
        module = name.removesuffix(".weight")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = int(keep.sum())
    if not ranks:
        raise UpdateError("the delta changes no weight (best step 0?): there is no adapter to export")
    top = max(ranks.values())
    config = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(ranks), rank_pattern=dict(ranks),
                        alpha_pattern=dict(ranks), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model)
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        write_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return {"path": str(out), "modules": len(ranks), "max_rank": top, "ranks": ranks}


def export_lora(run_or_delta: str | Path, out: str | Path, base: str | None = None) -> dict:
    """`cca-ray export-lora`: the adapter of a run folder's cca_delta.safetensors (or of a delta file),
    over the base model the delta names (or ``base``), whose weights are read lazily."""
    from safetensors import safe_open

    path = Path(run_or_delta)
    path = path / "cca_delta.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sparse delta here; pass a `cca-ray run` output folder "
                                "(it holds cca_delta.safetensors) or a delta file")
    with safe_open(str(path), framework="pt") as f:
        base = base or (f.metadata() or {}).get("base")
    if not base:
        raise UpdateError(f"{path} names no base model: pass --base")
    return write_lora_adapter(load_delta(path), checkpoint_reader(base), base, out)
