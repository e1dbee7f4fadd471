"""Bridges between a dense model and its sparse twin (Gao et al. 2025): per sublayer (site s = the
residual stream after sublayer s) an encoder dense -> sparse (linear + AbsTopK) and a decoder
sparse -> dense (linear), so a sparse channel, or an edit of it, can be read in the dense model.

Loss, summed over sites: NMSE of both maps + KL(dense output || dense up to s, encoded, the rest in
the sparse model) + KL(dense output || sparse up to s, decoded, the rest in the dense model).
The paper trains bridges jointly with the sparse model; here both models are frozen and the
bridges are trained after them, so the pruned circuits stay exactly those of the trained model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cca_ray.circuits.model import SparseGPT, abs_topk
from cca_ray.circuits.tasks import TaskBatch, task_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BridgeSpec:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    nmse_coef: float = 1.0
    kl_coef: float = 1.0
    topk_fraction: float | None = 0.25  # the encoder's AbsTopK k = d_sparse x this (None: off)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Bridges(nn.Module):
    """One encoder (dense -> sparse, + AbsTopK) and one decoder (sparse -> dense) per site."""

    def __init__(self, d_dense: int, d_sparse: int, sites: int, topk_fraction: float | None = 0.25):
        super().__init__()
        self.enc = nn.ModuleList(nn.Linear(d_dense, d_sparse) for _ in range(sites))
        self.dec = nn.ModuleList(nn.Linear(d_sparse, d_dense) for _ in range(sites))
        self.topk_fraction = topk_fraction

    @property
    def sites(self) -> int:
        return len(self.enc)

    def encode(self, site: int, h: torch.Tensor) -> torch.Tensor:
        x = self.enc[site](h)
        if self.topk_fraction is not None:
            x = abs_topk(x, max(1, int(x.shape[-1] * self.topk_fraction)))
        return x

    def decode(self, site: int, h: torch.Tensor) -> torch.Tensor:
        return self.dec[site](h)


def residuals(model: SparseGPT, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream after every sublayer (site 0 = after the first attention)."""
    x, out = model.embedded(tokens), []
    for f in model.sublayers():
        x = f(x)
        out.append(x)
    return out


def run_from(model: SparseGPT, x: torch.Tensor, site: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits when the residual stream after sublayer `site` is `x` and the rest runs in `model`."""
    for f in model.sublayers()[site + 1:]:
        x = f(x)
    return model.logits(x, tokens)


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error over the target's variance (both summed over channels, averaged over tokens)."""
    flat = target.reshape(-1, target.shape[-1])
    var = (flat - flat.mean(0)).pow(2).sum(-1).mean()
    return (pred - target).reshape(-1, target.shape[-1]).pow(2).sum(-1).mean() / var.clamp_min(1e-12)


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per token, averaged."""
    ref = F.log_softmax(ref_logits.reshape(-1, ref_logits.shape[-1]), -1)
    out = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
    return F.kl_div(out, ref, log_target=True, reduction="batchmean")


def bridge_loss(b: Bridges, dense: SparseGPT, sparse: SparseGPT, tokens: torch.Tensor,
                s: BridgeSpec) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss on a batch of token windows, and its four parts (means over sites)."""
    with torch.no_grad():
        h_d, h_s = residuals(dense, tokens), residuals(sparse, tokens)
        ref = dense.logits(h_d[-1], tokens)
    parts = {"nmse_enc": 0.0, "nmse_dec": 0.0, "kl_enc": 0.0, "kl_dec": 0.0}
    total = torch.zeros(())
    for site in range(b.sites):
        enc, dec = b.encode(site, h_d[site]), b.decode(site, h_s[site])
        terms = {"nmse_enc": nmse(enc, h_s[site]), "nmse_dec": nmse(dec, h_d[site]),
                 "kl_enc": kl(ref, run_from(sparse, enc, site, tokens)),
                 "kl_dec": kl(ref, run_from(dense, dec, site, tokens))}
        total = total + s.nmse_coef * (terms["nmse_enc"] + terms["nmse_dec"]) \
            + s.kl_coef * (terms["kl_enc"] + terms["kl_dec"])
        for k, v in terms.items():
            parts[k] += float(v.detach()) / b.sites
    return total / b.sites, parts


def train_bridges(dense: SparseGPT, sparse: SparseGPT, tokens: torch.Tensor, s: BridgeSpec,
                  progress: bool = False) -> tuple[Bridges, list[dict]]:
    """Bridges between two frozen models, trained on random corpus windows with Adam."""
    from tqdm.auto import tqdm

    from cca_ray.circuits.train import batches

    if dense.spec.n_layer != sparse.spec.n_layer or dense.spec.n_ctx != sparse.spec.n_ctx:
        raise ValueError(f"bridges need models with the same layers and context: dense has "
                         f"{dense.spec.n_layer} layers / n_ctx {dense.spec.n_ctx}, sparse "
                         f"{sparse.spec.n_layer} / {sparse.spec.n_ctx}")
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    b = Bridges(dense.spec.d_model, sparse.spec.d_model, 2 * dense.spec.n_layer, s.topk_fraction)
    opt = torch.optim.Adam(b.parameters(), lr=s.lr)
    models = (dense, sparse)
    for m in models:
        m.eval()
        m.requires_grad_(False)
    history, start = [], time.perf_counter()
    try:
        for step in tqdm(range(s.steps), desc="bridges", disable=not progress, mininterval=2.0):
            for g in opt.param_groups:  # cosine decay: the last steps settle
                g["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * step / s.steps))
            window = batches(tokens, dense.spec.n_ctx, s.batch_size, gen)[:, :-1]
            loss, parts = bridge_loss(b, dense, sparse, window, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step == s.steps - 1:
                history.append({"step": step, "loss": float(loss.detach()), **parts,
                                "seconds": time.perf_counter() - start})
    finally:
        for m in models:
            m.requires_grad_(True)
    return b, history


@torch.no_grad()
def bridged_task_losses(b: Bridges, dense: SparseGPT, sparse: SparseGPT, batch: TaskBatch) -> dict:
    """Task loss of the dense model, the sparse model, and per site each bridged forward pass:
    `encoded` (dense up to the site, the rest sparse) and `decoded` (sparse up to it, the rest dense)."""
    width = int(batch.last.max()) + 1
    tokens = batch.tokens[:, :width]
    rows = torch.arange(len(batch.last))

    def loss(logits: torch.Tensor) -> float:
        return float(task_loss(logits[rows, batch.last], batch))

    dense.eval()
    sparse.eval()
    h_d, h_s = residuals(dense, tokens), residuals(sparse, tokens)
    out = {"dense": loss(dense.logits(h_d[-1], tokens)), "sparse": loss(sparse.logits(h_s[-1], tokens)),
           "encoded": [], "decoded": []}
    for site in range(b.sites):
        out["encoded"].append(loss(run_from(sparse, b.encode(site, h_d[site]), site, tokens)))
        out["decoded"].append(loss(run_from(dense, b.decode(site, h_s[site]), site, tokens)))
    return out
