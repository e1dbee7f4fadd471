"""The weight-sparse GPT of Gao et al. (2025): a GPT-2-style decoder with RMSNorm, untied
embeddings, optional attention sinks and bigram table, and AbsTopK activation sparsity.

Every place where a circuit node lives (a channel after each RMSNorm, the final one that the
unembedding reads included, q/k/v channels, MLP neurons, block outputs before the residual add) goes
through `self.node(name, x)`, so pruning, mean recording and snippet collection hook in at one point
without touching the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# node locations of one layer, in forward order; `dim` below gives each one's width
LOCATIONS = ("attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp", "mlp_out")
# after the last layer: the final RMSNorm's output, which the unembedding reads (named L{n_layer}.final).
# Without it the embedding's direct path to the logits cannot be ablated, and a circuit must spend
# nodes cancelling what that path says about the last token.
FINAL = "final"
NODE_KINDS = (*LOCATIONS, FINAL)  # every node location kind, in forward order


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the model; stored beside its weights so a checkpoint rebuilds itself."""

    vocab_size: int
    n_layer: int = 4
    d_model: int = 128
    d_head: int = 16
    d_mlp: int = 512
    n_ctx: int = 64
    sinks: bool = True
    bigram: bool = False
    pos_emb: bool = False
    act_topk_fraction: float | None = 0.25  # AbsTopK k = dim x this; None: no activation sparsity

    @property
    def n_head(self) -> int:
        return self.d_model // self.d_head

    def dim(self, location: str) -> int:
        """Width (number of nodes) of one node location in a layer."""
        return self.d_mlp if location == "mlp" else self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


def node_name(layer: int, location: str) -> str:
    """The stable name of a node location, e.g. 'L2.mlp' (TransformerLens-like addressing)."""
    return f"L{layer}.{location}"


def abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k entries of largest magnitude along the last dimension, zero the rest."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices  # unsorted: the same set, ~1.6x faster on CPU
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


class RMSNorm(nn.Module):
    """RMSNorm with a gain and no bias: zero stays zero, so pruning's zero keeps its meaning."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, model: SparseGPT):
        super().__init__()
        d, h = spec.d_model, spec.n_head * spec.d_head
        self.spec, self.layer = spec, layer
        self._model = [model]  # a list, so the parent is not registered as a submodule
        self.ln_attn, self.ln_mlp = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, h, bias=False) for _ in range(3))
        self.o = nn.Linear(h, d, bias=False)
        self.mlp_in = nn.Linear(d, spec.d_mlp, bias=False)
        self.mlp_out = nn.Linear(spec.d_mlp, d, bias=False)
        self.sink = nn.Parameter(torch.zeros(spec.n_head)) if spec.sinks else None

    def _act(self, location: str, x: torch.Tensor) -> torch.Tensor:
        """AbsTopK at a location, then the node hook."""
        frac = self.spec.act_topk_fraction
        if frac is not None:
            x = abs_topk(x, max(1, int(x.shape[-1] * frac)))
        return self._model[0].node(node_name(self.layer, location), x)

    def attention(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Causal multi-head attention [b, t, d]; with `positions` [b], queries only at each row's
        position (keys and values still at every position): [b, 1, d]."""
        b, t, _ = x.shape
        nh, dh = self.spec.n_head, self.spec.d_head
        rows = None if positions is None else torch.arange(b, device=x.device)
        xq = x if rows is None else x[rows, positions][:, None]
        tq = xq.shape[1]
        q = self._act("q", self.q(xq)).view(b, tq, nh, dh).transpose(1, 2)
        k = self._act("k", self.k(x)).view(b, t, nh, dh).transpose(1, 2)
        v = self._act("v", self.v(x)).view(b, t, nh, dh).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        if rows is None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        else:  # row i's query sees keys 0..positions[i]
            causal = (torch.arange(t, device=x.device) <= positions[:, None]).view(b, 1, 1, t)
        scores = scores.masked_fill(~causal, float("-inf"))
        if self.sink is not None:  # an extra key slot with zero value and a learned logit per head
            sink = self.sink.view(1, nh, 1, 1).expand(b, nh, tq, 1)
            probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :t]
        else:
            probs = scores.softmax(-1)
        return (probs @ v).transpose(1, 2).reshape(b, tq, nh * dh)

    def attn_sublayer(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after this block's attention ([b, 1, d] at `positions` if given)."""
        a = self._act("attn_in", self.ln_attn(x))
        if positions is not None:
            x = x[torch.arange(len(positions), device=x.device), positions][:, None]
        return x + self._act("attn_out", self.o(self.attention(a, positions)))

    def mlp_sublayer(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after this block's MLP."""
        m = self._act("mlp_in", self.ln_mlp(x))
        m = self._act("mlp", F.gelu(self.mlp_in(m)))
        return x + self._act("mlp_out", self.mlp_out(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_sublayer(self.attn_sublayer(x))


class SparseGPT(nn.Module):
    """The decoder. Weight sparsity is imposed from outside (train.py), so the same class is
    the sparse model and its dense twin."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos = nn.Embedding(spec.n_ctx, spec.d_model) if spec.pos_emb else None
        self.blocks = nn.ModuleList(Block(spec, i, self) for i in range(spec.n_layer))
        self.ln_f = RMSNorm(spec.d_model)
        self.unembed = nn.Linear(spec.d_model, spec.vocab_size, bias=False)
        self.bigram = nn.Parameter(torch.zeros(spec.vocab_size, spec.vocab_size)) if spec.bigram else None
        self.node_fn: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)

    def node(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Every node location passes through here; `node_fn` (if set) may record or replace x."""
        return x if self.node_fn is None else self.node_fn(name, x)

    def node_locations(self) -> dict[str, int]:
        """Every node location name -> its width, in forward order."""
        n = self.spec.n_layer
        layers = {node_name(i, loc): self.spec.dim(loc) for i in range(n) for loc in LOCATIONS}
        return {**layers, node_name(n, FINAL): self.spec.d_model}

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, time, vocab] for token ids [batch, time]; with `positions` [batch], only each
        row's logits at its position, [batch, vocab] (the unembedding skipped everywhere else)."""
        t = tokens.shape[1]
        if t > self.spec.n_ctx:
            raise ValueError(f"sequence of {t} tokens is longer than the model's context "
                             f"({self.spec.n_ctx}); raise model.n_ctx or shorten the input")
        x = self.embedded(tokens)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        if positions is None:
            return self.logits(last(x), tokens)
        # a causal model's last block matters only at the scored positions: keys and values are
        # computed everywhere, the rest (queries, attention output, MLP) only there (~40% less work)
        x = last.mlp_sublayer(last.attn_sublayer(x, positions))
        rows = torch.arange(len(positions), device=tokens.device)
        return self.logits(x, tokens[rows, positions][:, None])[:, 0]

    def embedded(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream before the first block."""
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return x

    def logits(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the final residual stream (+ the bigram table of the input tokens)."""
        logits = self.unembed(self.node(node_name(self.spec.n_layer, FINAL), self.ln_f(x)))
        if self.bigram is not None:
            logits = logits + self.bigram[tokens]
        return logits

    def sublayers(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Every sublayer in forward order (attention, MLP, attention, ...): site s of a bridge is
        the residual stream after sublayer s."""
        return [f for b in self.blocks for f in (b.attn_sublayer, b.mlp_sublayer)]

    def sparse_matrices(self) -> dict[str, nn.Parameter]:
        """The weight matrices that weight-sparse training sparsifies (not gains, sinks, bigram)."""
        return {n: p for n, p in self.named_parameters()
                if p.dim() == 2 and n != "bigram"}


def is_embedding(name: str) -> bool:
    """Embedding-like matrices get a milder L0 fraction than the rest."""
    return name.split(".")[0] in ("embed", "unembed", "pos")
