"""Weight sync into a running vLLM engine that sends only what changed.

The driver turns a `WeightUpdate` (HF parameter name -> whole weight, changed `Rows`, a `LowRank`
product, or None for the checkpoint's) into one op per vLLM module (`sync_ops`): q/k/v and gate/up
live in vLLM's fused qkv_proj / gate_up_proj, so each HF part becomes a row range of its fused
module, and a row update of k rows sends k rows. The worker extension (`WeightSync.cca_sync`, run
through `collective_rpc` with a timeout) writes them in place; what it needs of the checkpoint (the
base under a LoRA product, a reset) it reads from the model folder itself, so nothing whole crosses
the RPC. vLLM's CPU build repacks linear weights for oneDNN and keeps no plain copy: there the worker
keeps one per module it changed (from the checkpoint, then updated) and repacks after each sync.

Tensor parallelism is not handled (one worker holds every row): vLLM's native weight-transfer API
(NCCL, whole named tensors) is the path for sharded engines; see the README."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cca_ray.sampling.weights import Entry, LowRank, Rows, WeightUpdate, decode, encode, materialise

# HF projection -> (vLLM fused module, the order of the parts inside it); the same for every
# architecture in the components table (vLLM fuses q/k/v and gate/up alike for all of them).
FUSED = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "k_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "v_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
         "up_proj": ("gate_up_proj", ("gate_proj", "up_proj"))}

Op = tuple[str, list[str], list[int], list[tuple]]  # (vLLM module, its HF parts, its shape, part contents)


class WeightSyncError(RuntimeError):
    """A weight sync did not complete (timed out or failed in the engine): the engine's weights are
    unknown, so the run or trial must fail (Tune retries a trial)."""


def vllm_module(name: str) -> tuple[str, list[str]]:
    """(vLLM module path, the HF weights it holds in order) for an HF parameter name."""
    module_path, _, leaf = name.rpartition(".")
    if leaf != "weight":
        raise ValueError(f"cannot sync {name} to vLLM: only weights are synced (not biases)")
    parent, _, proj = module_path.rpartition(".")
    if proj not in FUSED:  # o_proj, down_proj, norms, embeddings, lm_head: the same module path
        return module_path, [name]
    fused, order = FUSED[proj]
    return f"{parent}.{fused}", [f"{parent}.{p}.weight" for p in order]


def sync_ops(shape: Callable[[str], list[int]], update: WeightUpdate) -> list[Op]:
    """The update as one op per vLLM module; ``shape(hf_name)`` gives a checkpoint weight's shape.
    A part is (kind, hf name, first row in the module, rows, payload...): "reset" (the checkpoint's),
    "block" (a whole weight), "rows" (index, values), "lowrank" (a, b, scale)."""
    ops: dict[str, Op] = {}
    for name, entry in update.items():
        module, parts = vllm_module(name)
        shapes = [shape(p) for p in parts]
        at = parts.index(name)
        offset, rows = sum(s[0] for s in shapes[:at]), shapes[at][0]
        op = ops.setdefault(module, (module, parts, [sum(s[0] for s in shapes), *shapes[0][1:]], []))
        head = (name, offset, rows)
        if entry is None:
            op[3].append(("reset", *head))
        elif isinstance(entry, Rows):
            op[3].append(("rows", *head, encode(entry.index.long()), encode(entry.values)))
        elif isinstance(entry, LowRank):
            op[3].append(("lowrank", *head, encode(entry.a), encode(entry.b), float(entry.scale)))
        else:
            op[3].append(("block", *head, encode(entry)))
    return list(ops.values())


def decode_part(kind: str, payload: list) -> Entry:
    """The update entry a part of `sync_ops` carries (its inverse, in the worker)."""
    if kind == "reset":
        return None
    if kind == "block":
        return decode(payload[0])
    if kind == "rows":
        return Rows(decode(payload[0]), decode(payload[1]))
    if kind == "lowrank":
        return LowRank(decode(payload[0]), decode(payload[1]), payload[2])
    raise ValueError(f"unknown sync part {kind!r}")


def op_bytes(ops: list[Op]) -> int:
    """Bytes of tensor data in the ops: what crosses the RPC."""
    return sum(len(x[0]) for _, _, _, parts in ops for part in parts for x in part
               if isinstance(x, tuple) and x and isinstance(x[0], bytes))


class WeightSync:
    """vLLM worker extension (``worker_extension_cls``): applies `sync_ops` in the worker. Every module
    holding a weight gets it (a tied lm_head holds the embedding's), and one whose CPU kernel was
    packed from it (``cpu_linear``: linears, lm_head) repacks."""

    def cca_sync(self, model_dir: str, ops: list[Op]) -> int:
        from cca_ray.io import checkpoint_reader

        runner = self.model_runner  # type: ignore[attr-defined]
        modules = dict(runner.model.named_modules())
        plain: dict[str, torch.Tensor] = self.__dict__.setdefault("_cca_plain", {})
        reader: list[Any] = []

        def read(name: str) -> torch.Tensor:
            if not reader:
                reader.append(checkpoint_reader(model_dir))
            return reader[0](name)

        applied = 0
        with torch.no_grad():
            for module, hf_parts, shape, parts in ops:
                if module not in modules:
                    raise KeyError(f"vLLM has no module {module!r}: this architecture's names differ "
                                   f"from HF's")
                w = modules[module].weight
                holders = [m for m in modules.values() if getattr(m, "weight", None) is w]
                packed = w.numel() == 0 or w.dim() != len(shape)  # repacked for oneDNN (CPU build)
                if not packed and (list(w.shape[1:]) != shape[1:] or w.shape[0] < shape[0]):
                    raise ValueError(f"cannot sync {module}: vLLM holds {tuple(w.shape)}, the checkpoint "
                                     f"{shape}")
                if packed and module not in plain:
                    plain[module] = torch.cat([read(p) for p in hf_parts]).to(runner.model_config.dtype)
                target = plain[module] if packed else w  # a vocabulary vLLM padded keeps its padding rows
                for kind, name, offset, rows, *payload in parts:
                    block, entry = target[offset : offset + rows], decode_part(kind, payload)
                    if isinstance(entry, Rows):  # in place: only these rows cross and change
                        block[entry.index.to(block.device)] = entry.values.to(block.device, block.dtype)
                    elif isinstance(entry, torch.Tensor):
                        block.copy_(entry)
                    else:  # LoRA product or reset: the HF side's formula, the checkpoint read here
                        block.copy_(materialise(entry, read(name)))
                    applied += 1
                if packed:
                    w = torch.nn.Parameter(target.clone().to(w.device), requires_grad=False)
                    for m in holders:
                        m.weight = w
                for m in holders:
                    if packed or hasattr(m, "cpu_linear"):  # a kernel packed from the old values
                        m.quant_method.process_weights_after_loading(m)
        return applied
