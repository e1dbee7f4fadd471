"""Trainable weight rows: for each selected component, the rows of q/k/v_proj or up_proj it owns,
trained as a small delta tensor per module (the full weight never gets a gradient), so memory
grows with the selection, not with the model."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from cca_ray.components import KINDS, ComponentSpace, param_name_rows
from cca_ray.sampling.weights import Rows


def selected_rows(model, space: ComponentSpace, selected: dict[str, torch.Tensor],
                  kinds: tuple[str, ...] | list[str] = KINDS) -> dict[str, torch.Tensor]:
    """Parameter name -> sorted row indices the update may touch for the selected components."""
    rows: dict[str, set[int]] = defaultdict(set)
    for kind in kinds:
        if kind not in selected:
            continue
        for layer, index in torch.nonzero(selected[kind]).tolist():
            name, sl = param_name_rows(model, space, layer, kind, index)
            rows[name].update(range(sl.start, sl.stop))
    return {name: torch.tensor(sorted(r), dtype=torch.long) for name, r in sorted(rows.items())}


class RowDeltas(torch.nn.Module):
    """One zero-initialised delta [n_rows, in] per linear; while attached, each linear outputs
    W x + scatter(rows, D x): the same as training W[rows] in place, without a full-weight grad."""

    def __init__(self, model, rows: dict[str, torch.Tensor]):
        super().__init__()
        params = dict(model.named_parameters())
        self.names = list(rows)
        self.rows = {n: r.to(params[n].device) for n, r in rows.items()}
        self.deltas = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(len(r), params[n].shape[1], dtype=params[n].dtype,
                                           device=params[n].device)) for n, r in rows.items())
        modules = dict(model.named_modules())
        self.linears = [modules[n.rsplit(".", 1)[0]] for n in self.names]

    @contextmanager
    def attached(self):
        """Forward hooks that add the row deltas to the linears' outputs; removed on exit."""
        handles = []
        for linear, rows, delta in zip(self.linears, self.rows.values(), self.deltas, strict=True):
            def hook(module, inputs, output, rows=rows, delta=delta):
                extra = inputs[0] @ delta.t()
                return output.index_add(-1, rows, extra)
            handles.append(linear.register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> a copy of its weight with the current deltas added to its rows (what a
        separate inference engine must load to see this model)."""
        params = {n: lin.weight for n, lin in zip(self.names, self.linears, strict=True)}
        out = {}
        with torch.no_grad():
            for (name, rows), d in zip(self.rows.items(), self.deltas, strict=True):
                w = params[name].detach().clone()
                w[rows] += d.detach().to(w.dtype)
                out[name] = w
        return out

    def merged_rows(self) -> dict[str, Rows]:
        """Parameter name -> its selected rows with the current deltas added: all a separate inference
        engine must load to see this model (a weight sync sends these rows, not the weights)."""
        params = {n: lin.weight for n, lin in zip(self.names, self.linears, strict=True)}
        with torch.no_grad():
            return {name: Rows(rows.cpu(), (params[name][rows] + d.to(params[name].dtype)).detach().cpu())
                    for (name, rows), d in zip(self.rows.items(), self.deltas, strict=True)}

    def snapshot(self) -> list[torch.Tensor]:
        return [d.detach().clone() for d in self.deltas]

    def load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for d, v in zip(self.deltas, values, strict=True):
                d.copy_(v)

    def parameter_count(self) -> int:
        return sum(d.numel() for d in self.deltas)


def merge_rows(model, rows: dict[str, torch.Tensor], deltas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write W[rows] += D into the model; return name -> the new rows (the sparse delta's values)."""
    params = dict(model.named_parameters())
    new = {}
    with torch.no_grad():
        for (name, r), d in zip(rows.items(), deltas, strict=True):
            w = params[name]
            values = w[r] + d.to(w.dtype)
            w[r] = values
            new[name] = values.detach().cpu().clone()
    return new
