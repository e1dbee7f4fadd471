"""Weight-sparse training (Gao et al. 2025): after every optimizer step each weight matrix keeps
only its largest-magnitude L0 fraction (at least j per neuron), L0 annealed from dense to the
target, the "sharkfin" LR, Adam(0.9, 0.95, eps 0.1) with decoupled weight decay and the
gradient rescaled to RMS 1. A target L0 of 1.0 is the dense twin, trained by the same code.

Checkpoints (weights + Adam moments + step) are written every `checkpoint_every` steps, so a
killed run resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from cca_ray.circuits.model import ModelSpec, SparseGPT, is_embedding
from cca_ray.io import write_json, write_safetensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    """Numbers of one training run (config.py's `train` section plus the variant's L0)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-2
    l0_target: float = 1.0          # fraction of weights kept per matrix at the end of annealing
    embed_l0_factor: float = 4.0    # embeddings keep min(1, factor x L0)
    min_per_neuron: int = 4         # j: weights always kept per output neuron (row)
    anneal_start: float = 0.01      # fraction of training where L0 annealing starts
    anneal_end: float = 0.5         # ... and where it reaches the target
    warmup: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1
    eval_every: int = 250
    eval_batches: int = 8
    checkpoint_every: int = 500
    seed: int = 0
    stop_at_loss: float | None = None  # matched loss: stop once the val loss is at or below this
    match_every: int = 50               # ... checked this often (steps)


def l0_fraction(step: int, s: TrainSpec) -> float:
    """Kept fraction at `step`: 1 until anneal_start, linear to the target at anneal_end, then flat."""
    a, b = s.anneal_start * s.steps, s.anneal_end * s.steps
    if step <= a:
        return 1.0
    if step >= b:
        return s.l0_target
    return 1.0 + (s.l0_target - 1.0) * (step - a) / (b - a)


def lr_at(step: int, s: TrainSpec) -> float:
    """Sharkfin LR: linear warmup, linear decay to 0, times sqrt(L0_target / L0_now)."""
    warm = max(1.0, s.warmup * s.steps)
    shape = step / warm if step < warm else max(0.0, (s.steps - step) / max(1.0, s.steps - warm))
    return s.lr * shape * math.sqrt(s.l0_target / l0_fraction(step, s))


def kept_count(shape: tuple[int, int], fraction: float, min_per_neuron: int) -> int:
    """How many weights a matrix of `shape` (rows = neurons) keeps at `fraction`."""
    rows, cols = shape
    floor = rows * min(min_per_neuron, cols)
    return min(rows * cols, max(floor, round(fraction * rows * cols)))


def topk_mask(w: torch.Tensor, fraction: float, min_per_neuron: int) -> torch.Tensor:
    """Boolean mask of exactly `kept_count` weights: each row's top j by magnitude, then the
    largest of the rest."""
    n = kept_count(tuple(w.shape), fraction, min_per_neuron)
    if n >= w.numel():
        return torch.ones_like(w, dtype=torch.bool)
    mag = w.detach().abs()
    mask = torch.zeros_like(w, dtype=torch.bool)
    j = min(min_per_neuron, w.shape[1])
    if j:
        mask.scatter_(1, mag.topk(j, dim=1).indices, True)
    rest = n - int(mask.sum())
    if rest > 0:
        free = mag.masked_fill(mask, -1.0).flatten()
        mask.view(-1)[free.topk(rest, sorted=False).indices] = True  # a set: unsorted is ~5x faster
    return mask


@torch.no_grad()
def sparsify_(model: SparseGPT, fraction: float, s: TrainSpec) -> dict[str, int]:
    """Zero all but the top weights of every sparse matrix, in place; returns kept counts."""
    kept = {}
    for name, w in model.sparse_matrices().items():
        frac = min(1.0, fraction * s.embed_l0_factor) if is_embedding(name) else fraction
        mask = topk_mask(w, frac, s.min_per_neuron)
        w.mul_(mask)
        kept[name] = int(mask.sum())
    return kept


def make_optimizer(model: SparseGPT, s: TrainSpec) -> torch.optim.AdamW:
    """AdamW(0.9, 0.95, eps 0.1); decoupled weight decay on the matrices only."""
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "bigram"]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "bigram")]
    return torch.optim.AdamW([{"params": mats, "weight_decay": s.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps)


def rescale_grads_(model: SparseGPT) -> float:
    """Rescale the whole gradient to RMS 1 (essential for stability, per the paper); returns the old RMS."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = sum(float(g.pow(2).sum()) for g in grads)
    count = sum(g.numel() for g in grads)
    rms = math.sqrt(total / max(count, 1))
    if rms > 0:
        for g in grads:
            g.div_(rms)
    return rms


def batches(tokens: torch.Tensor, n_ctx: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """A batch of random windows [batch, n_ctx + 1] of the token stream."""
    starts = torch.randint(0, len(tokens) - n_ctx - 1, (batch_size,), generator=gen)
    return torch.stack([tokens[i:i + n_ctx + 1] for i in starts.tolist()])


def lm_loss(model: SparseGPT, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())


@torch.no_grad()
def eval_loss(model: SparseGPT, tokens: torch.Tensor, s: TrainSpec, batch_size: int | None = None) -> float:
    """Mean LM loss over fixed held-out windows (same windows every call)."""
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [float(lm_loss(model, batches(tokens, model.spec.n_ctx, batch_size or s.batch_size, gen)))
              for _ in range(s.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def nonzero_fraction(model: SparseGPT, embeddings: bool = False) -> float:
    """Fraction of nonzero weights over the sparse matrices (embedding-like ones excluded by default)."""
    mats = [w for n, w in model.sparse_matrices().items() if embeddings or not is_embedding(n)]
    return sum(int((w != 0).sum()) for w in mats) / sum(w.numel() for w in mats)


# ---- checkpoints: safetensors for tensors, JSON for the rest ------------------------------------

def save_model(model: SparseGPT, path: Path, extra: dict | None = None) -> None:
    """weights.safetensors + model.json (the spec and anything in `extra`), written atomically."""
    write_safetensors(model.state_dict(), path / "weights.safetensors")
    write_json({"spec": model.spec.to_dict(), **(extra or {})}, path / "model.json")


def load_model(path: str | Path) -> SparseGPT:
    """A model saved by save_model (the spec rebuilds the module, then the weights load)."""
    path = Path(path)
    if not (path / "model.json").is_file():
        raise FileNotFoundError(f"{path}: no model.json here; train one with `cca-ray circuits train`")
    meta = json.loads((path / "model.json").read_text())
    model = SparseGPT(ModelSpec(**meta["spec"]))
    model.load_state_dict(load_file(str(path / "weights.safetensors")))
    return model


def _save_checkpoint(model: SparseGPT, opt: torch.optim.Optimizer, step: int, history: list, ckpt: Path,
                     gen: torch.Generator) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                state[f"{names[id(p)]}.exp_avg"] = st["exp_avg"]
                state[f"{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"]
                state[f"{names[id(p)]}.step"] = torch.as_tensor(st["step"]).reshape(1).float()
    state["rng"] = gen.get_state()
    save_model(model, ckpt, {"step": step, "history": history})
    write_safetensors(state, ckpt / "optimizer.safetensors")  # last: its presence marks a whole checkpoint


def _load_checkpoint(model: SparseGPT, opt: torch.optim.Optimizer, ckpt: Path,
                     gen: torch.Generator) -> tuple[int, list]:
    meta = json.loads((ckpt / "model.json").read_text())
    model.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
    state = load_file(str(ckpt / "optimizer.safetensors"))
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" in state:
            opt.state[p] = {"exp_avg": state[f"{name}.exp_avg"], "exp_avg_sq": state[f"{name}.exp_avg_sq"],
                            "step": state[f"{name}.step"].reshape(())}
    gen.set_state(state["rng"])
    return int(meta["step"]), list(meta["history"])


def train(spec: ModelSpec, s: TrainSpec, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
          out: str | Path, progress: bool = True,
          on_step: Callable[[int, SparseGPT], None] | None = None,
          checkpoint: str | Path | None = None) -> SparseGPT:
    """Train (or resume) one model into `out` (weights, model.json with the loss history).

    A finished run (out/model.json with `done`) is loaded, not retrained. `on_step(step, model)`
    runs after each step's sparsification (tests watch the invariant through it). `checkpoint`
    (default out/checkpoint) is where the run resumes from: outside `out` when `out` is a stage's
    temporary folder, which a restarted stage starts afresh. With `s.stop_at_loss` the run stops at
    the first check (every `match_every` steps) whose val loss is at or below it (matched loss).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if (out / "model.json").is_file() and json.loads((out / "model.json").read_text()).get("done"):
        log.info("%s: already trained, loading", out)
        return load_model(out)
    torch.manual_seed(s.seed)
    model = SparseGPT(spec)
    opt = make_optimizer(model, s)
    gen = torch.Generator().manual_seed(s.seed)
    ckpt = Path(checkpoint) if checkpoint is not None else out / "checkpoint"
    step, history = 0, []
    if (ckpt / "optimizer.safetensors").is_file():
        step, history = _load_checkpoint(model, opt, ckpt, gen)
        log.info("%s: resuming from step %d", out, step)
    start = time.perf_counter()
    bar = tqdm(total=s.steps, initial=step, desc=f"train {out.name} (L0 {s.l0_target:g})",
               disable=not progress, mininterval=2.0)
    model.train()
    while step < s.steps:
        lr = lr_at(step, s)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = lm_loss(model, batches(train_tokens, spec.n_ctx, s.batch_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        rescale_grads_(model)
        opt.step()
        step += 1
        frac = l0_fraction(step, s)
        sparsify_(model, frac, s)
        if on_step is not None:
            on_step(step, model)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}", l0=f"{frac:.3g}", lr=f"{lr:.2g}")
        matching = s.stop_at_loss is not None and step % s.match_every == 0
        if step % s.eval_every == 0 or step == s.steps or matching:
            history.append({"step": step, "train_loss": float(loss),
                            "val_loss": eval_loss(model, val_tokens, s), "l0": frac, "lr": lr,
                            "seconds": time.perf_counter() - start})
            if matching and history[-1]["val_loss"] <= s.stop_at_loss:
                log.info("%s: val loss %.4f reached the matched loss %.4f at step %d; stopping", out,
                         history[-1]["val_loss"], s.stop_at_loss, step)
                break
        if step % s.checkpoint_every == 0 and step < s.steps:
            _save_checkpoint(model, opt, step, history, ckpt, gen)
    bar.close()
    final = history[-1] if history else {}
    save_model(model, out, {"done": True, "train": s.__dict__, "history": history,
                            "val_loss": final.get("val_loss"), "steps_trained": step,
                            "nonzero_fraction": nonzero_fraction(model),
                            "nonzero_fraction_with_embeddings": nonzero_fraction(model, embeddings=True)})
    return model
