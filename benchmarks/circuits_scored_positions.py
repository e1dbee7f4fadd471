"""Speed of the pruning forward + backward with the last block only at the scored positions, against
every block at every position (the path before), side by side on the default circuits model shape.

    python benchmarks/circuits_scored_positions.py [--threads 1] [--reps 20] [--ctx 38]

Prints seconds per step for both and their ratio; the logits and gate gradients must agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from cca_ray.circuits.model import ModelSpec, SparseGPT
from cca_ray.circuits.prune import MeanAblation


def every_position(model: SparseGPT, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The path before: every block at every position, the unembedding at the scored ones."""
    x = model.embedded(tokens)
    for block in model.blocks:
        x = block(x)
    rows = torch.arange(len(positions))
    return model.logits(x[rows, positions][:, None], tokens[rows, positions][:, None])[:, 0]


def step(model: SparseGPT, fn, tokens: torch.Tensor, positions: torch.Tensor, means: dict) -> tuple:
    gates = {n: torch.ones(d, requires_grad=True) for n, d in model.node_locations().items()}
    model.node_fn = MeanAblation(means, gates)
    logits = fn(tokens, positions)
    (logits[:, 1] - logits[:, 2]).pow(2).sum().backward()
    model.node_fn = None
    return logits.detach(), {n: g.grad for n, g in gates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=38, help="tokens per row (set_or_string's is 38)")
    ap.add_argument("--rows", type=int, default=128, help="rows per step (64 pairs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SparseGPT(ModelSpec(vocab_size=512, n_layer=2, d_model=256, d_mlp=1024, n_ctx=64, bigram=True))
    model.eval().requires_grad_(False)
    means = {n: 0.01 * torch.randn(d) for n, d in model.node_locations().items()}
    tokens = torch.randint(0, 512, (args.rows, args.ctx))
    positions = torch.full((args.rows,), args.ctx - 1)
    paths = {"every position": lambda t, p: every_position(model, t, p), "scored only": model}
    seconds, outs = {}, {}
    for name, fn in paths.items():
        outs[name] = step(model, fn, tokens, positions, means)  # warm-up, and the values compared below
    for name, fn in paths.items():
        start = time.perf_counter()
        for _ in range(args.reps):
            step(model, fn, tokens, positions, means)
        seconds[name] = (time.perf_counter() - start) / args.reps
    (a, ga), (b, gb) = outs.values()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-4)
    for name, s in seconds.items():
        print(f"{name:>15}: {1000 * s:7.1f} ms per forward + backward ({args.rows} rows x {args.ctx} tokens)")
    ratio = seconds["every position"] / seconds["scored only"]
    print(f"speed-up: {ratio:.2f}x (logits and gate gradients agree)")


if __name__ == "__main__":
    main()
