"""A pruned circuit as a readable object: named nodes, edges (nonzero weights between kept nodes),
a rendered picture, and the corpus snippets on which each kept node fires hardest.

Edges: attn_in -> q/k/v (W_q, W_k, W_v), v -> attn_out (W_o, same channel through the attention
mix), mlp_in -> mlp (W_in), mlp -> mlp_out (W_out), and residual edges from a block output
channel to the same channel of a later RMSNorm output, the final one (read by the unembedding)
included (the norm's gain is the weight). Every
edge is a nonzero weight; q and k nodes meet in the attention scores, which have no weight, so
they carry no q-k edge. Circuit sizes count edges as the paper does, without the residual links
(`edge_counts`; those are reported beside them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cca_ray.circuits.model import FINAL, NODE_KINDS, SparseGPT, node_name
from cca_ray.io import atomic_write

# location -> (weight matrix attribute of the block, source location): dst channel j, src channel i
_WEIGHT_EDGES = {"q": ("q", "attn_in"), "k": ("k", "attn_in"), "v": ("v", "attn_in"),
                 "attn_out": ("o", "v"), "mlp": ("mlp_in", "mlp_in"), "mlp_out": ("mlp_out", "mlp")}
_NORMS = {"attn_in": "ln_attn", "mlp_in": "ln_mlp"}


def _split(name: str) -> tuple[int, str]:
    layer, loc = name.split(".", 1)
    return int(layer[1:]), loc


def _norm(model: SparseGPT, layer: int, loc: str):
    """The RMSNorm whose output is this read location (None for other locations)."""
    if loc == FINAL:
        return model.ln_f
    return getattr(model.blocks[layer], _NORMS[loc]) if loc in _NORMS else None


def circuit_edges(model: SparseGPT, keep: dict[str, list[int]]) -> list[dict]:
    """Every nonzero weight between two kept nodes, as {src, dst, weight, kind}."""
    edges = []
    kept = {n: sorted(ix) for n, ix in keep.items() if ix}
    for dst_name, dst_ix in kept.items():
        layer, loc = _split(dst_name)
        if loc in _WEIGHT_EDGES:
            block = model.blocks[layer]
            attr, src_loc = _WEIGHT_EDGES[loc]
            src_ix = kept.get(node_name(layer, src_loc), [])
            if not src_ix:
                continue
            w = getattr(block, attr).weight.detach()[dst_ix][:, src_ix]
            for a, b in (w != 0).nonzero().tolist():
                edges.append({"src": f"{node_name(layer, src_loc)}.{src_ix[b]}",
                              "dst": f"{dst_name}.{dst_ix[a]}", "weight": float(w[a, b]), "kind": attr})
        norm = _norm(model, layer, loc)
        if norm is not None:  # residual: earlier block outputs' same channel -> this norm's output
            gain = norm.gain.detach()
            for src_name, src_ix in kept.items():
                s_layer, s_loc = _split(src_name)
                if s_loc not in ("attn_out", "mlp_out"):
                    continue
                earlier = s_layer < layer or (s_layer == layer and s_loc == "attn_out" and loc == "mlp_in")
                for i in sorted(set(src_ix) & set(dst_ix)) if earlier else []:
                    if float(gain[i]) != 0.0:
                        edges.append({"src": f"{src_name}.{i}", "dst": f"{dst_name}.{i}",
                                      "weight": float(gain[i]), "kind": "residual"})
    return edges


def edge_counts(edges: list[dict]) -> tuple[int, int]:
    """(edges as the paper counts them: nonzero weights between kept nodes, residual links: a block
    output's channel reaching the same channel of a later norm through the residual stream)."""
    residual = sum(e["kind"] == "residual" for e in edges)
    return len(edges) - residual, residual


def geometric_mean(values: list[float]) -> float | None:
    """The geometric mean of positive values (None when there are none): the paper's summary of
    dense/sparse circuit-size ratios over tasks."""
    import math

    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def circuit_nodes(keep: dict[str, list[int]], means: dict[str, torch.Tensor],
                  tau: dict[str, list[float]] | None = None) -> list[dict]:
    """The kept nodes with their layer, kind, index, ablation mean and learned tau."""
    nodes = []
    for name, ix in keep.items():
        layer, loc = _split(name)
        for pos, i in enumerate(ix):
            nodes.append({"name": f"{name}.{i}", "layer": layer, "kind": loc, "index": i,
                          "mean": float(means[name][i]),
                          **({"tau": tau[name][pos]} if tau and name in tau else {})})
    return sorted(nodes, key=lambda n: (n["layer"], NODE_KINDS.index(n["kind"]), n["index"]))


def render(circuit: dict, path: str | Path, title: str = "") -> Path:
    """Draw the circuit: columns in forward order (layer, location), nodes stacked, edges coloured
    by sign. matplotlib only (no graphviz binary needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes, edges = circuit["nodes"], circuit["edges"]
    columns = sorted({(n["layer"], NODE_KINDS.index(n["kind"])) for n in nodes})
    col_x = {c: i for i, c in enumerate(columns)}
    pos, per_col = {}, {}
    for n in nodes:
        c = (n["layer"], NODE_KINDS.index(n["kind"]))
        row = per_col.get(c, 0)
        per_col[c] = row + 1
        pos[n["name"]] = (col_x[c], -row)
    fig_w = max(4.0, 1.6 * len(columns))
    fig_h = max(3.0, 0.45 * max(per_col.values(), default=1) + 1.5)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    biggest = max((abs(e["weight"]) for e in edges), default=1.0) or 1.0
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["src"]], pos[e["dst"]]
        ax.plot([x0, x1], [y0, y1], color="tab:blue" if e["weight"] > 0 else "tab:red",
                lw=0.5 + 2.5 * abs(e["weight"]) / biggest, alpha=0.6, zorder=1)
    for name, (x, y) in pos.items():
        ax.scatter([x], [y], s=120, color="white", edgecolor="black", zorder=2)
        ax.annotate(name.split(".")[-1], (x, y), ha="center", va="center", fontsize=6, zorder=3)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([f"L{layer}\n{NODE_KINDS[loc]}" for layer, loc in columns], fontsize=7)
    ax.set_yticks([])
    ax.set_title(title or f"{len(nodes)} nodes, {len(edges)} edges", fontsize=9)
    if not nodes:
        ax.text(0.5, 0.5, "empty circuit", ha="center", transform=ax.transAxes)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=130), binary=True)
    finally:
        plt.close(fig)


@torch.no_grad()
def top_snippets(model: SparseGPT, tok, tokens: torch.Tensor, keep: dict[str, list[int]], windows: int = 256,
                 per_node: int = 5, context: int = 16, seed: int = 0) -> dict[str, list[dict]]:
    """Per kept node, the corpus positions where |activation| is largest: the text up to and
    including that token (the token itself in ⟦ ⟧; the document separator shows as <|endoftext|>)
    and the activation."""
    from cca_ray.circuits.train import batches

    gen = torch.Generator().manual_seed(seed)
    data = batches(tokens, model.spec.n_ctx, windows, gen)[:, :-1]
    acts: dict[str, list[torch.Tensor]] = {}

    def record(name: str, x: torch.Tensor) -> torch.Tensor:
        if keep.get(name):
            acts.setdefault(name, []).append(x[..., keep[name]].clone())
        return x

    model.eval()
    model.node_fn = record
    try:
        for chunk in data.split(64):
            model(chunk)
    finally:
        model.node_fn = None
    out = {}
    for name, ix in keep.items():
        if not ix:
            continue
        a = torch.cat(acts[name])  # [windows, T, len(ix)]
        for col, i in enumerate(ix):
            vals = a[..., col]
            top = vals.abs().flatten().topk(min(per_node * 8, vals.numel())).indices
            rows, seen = [], set()
            for flat in top.tolist():  # overlapping windows repeat a snippet: keep distinct texts
                w, t = divmod(flat, vals.shape[1])
                before = tok.decode(data[w, max(0, t - context + 1):t].tolist(), skip_special_tokens=False)
                token = tok.decode([int(data[w, t])], skip_special_tokens=False)
                text = f"{before}⟦{token}⟧"
                if text not in seen and len(rows) < per_node:
                    seen.add(text)
                    rows.append({"text": text, "activation": float(vals[w, t])})
            out[f"{name}.{i}"] = rows
    return out


def snippets_markdown(snippets: dict[str, list[dict]]) -> str:
    """The snippets as Markdown, one section per node (newlines shown as ⏎)."""
    lines = []
    for node, rows in snippets.items():
        lines.append(f"### {node}\n")
        for r in rows:
            text = r["text"].replace("\n", "⏎").replace("`", "'")
            lines.append(f"- `{text}` ({r['activation']:+.3f})")
        lines.append("")
    return "\n".join(lines)
