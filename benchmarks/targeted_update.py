"""Targeted update step: trainable row deltas (RowDeltas) vs full-parameter gradients masked afterwards.

One step = forward over a batch of prefixes, loss -mean(logit diff), backward, plain SGD on the
selected rows (~2% of the components: Q/K/V heads and MLP neurons). "rows" trains only the selected
rows as small delta tensors (the base weights never get a gradient); "full" is the naive way: every
parameter requires grad, the full gradient is computed and then zeroed outside the rows. Each variant
runs in a fresh subprocess; CPU memory is peak RSS minus RSS after the model load (the peak is reset
through /proc/self/clear_refs where the kernel allows, else ru_maxrss), CUDA memory is
max_memory_allocated minus the allocation after load.

    .venv/bin/python benchmarks/targeted_update.py [--quick] [--device cuda] [--large]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cca_ray.components import KINDS, component_space
from cca_ray.dcm import Example, full_logits, logit_difference
from cca_ray.update import RowDeltas, selected_rows

PAD = 0
LR = 1e-4
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=500),
    "medium": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=64, vocab_size=32000),
    "large": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=32000),
}


# ---------------------------------------------------------------- worker (one variant, fresh process)


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) so the peak excludes the model load's transients."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(args: argparse.Namespace) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor], list[Example]]:
    """The seeded random model, the selected rows (~fraction of each kind) and the prefixes."""
    torch.manual_seed(0)
    config = MODELS[args.model]
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=4096))
    model = model.to(getattr(torch, args.dtype)).eval()
    space = component_space(model)
    gen = torch.Generator().manual_seed(1)
    selected = {k: torch.rand(space.shape(k), generator=gen) < args.fraction for k in KINDS}
    rows = selected_rows(model, space, selected)
    rng = random.Random(0)
    examples = []
    for _ in range(args.batch):
        ids = [rng.randrange(1, config["vocab_size"]) for _ in range(rng.randint(int(0.9 * args.length),
                                                                                 args.length))]
        examples.append(Example(ids, *rng.sample(range(1, config["vocab_size"]), 2)))
    return model, rows, examples


def worker(args: argparse.Namespace) -> None:
    model, rows, examples = build(args)
    cuda = args.device == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    if args.variant == "rows":
        for p in model.parameters():
            p.requires_grad_(False)
        deltas = RowDeltas(model, rows)
        trainable = deltas.parameter_count()

        def step() -> tuple[float, float]:
            deltas.zero_grad(set_to_none=True)
            with deltas.attached():
                loss = -logit_difference(full_logits(model, examples, PAD), examples).mean()
                loss.backward()
            norm = torch.sqrt(sum((d.grad.float() ** 2).sum() for d in deltas.deltas)).item()
            with torch.no_grad():
                for d in deltas.deltas:
                    d -= LR * d.grad
            return loss.item(), norm
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = n_params
        keep = {}
        for name, r in rows.items():
            keep[name] = torch.zeros(params[name].shape[0], 1, dtype=torch.bool, device=args.device)
            keep[name][r.to(args.device)] = True

        def step() -> tuple[float, float]:
            model.zero_grad(set_to_none=True)
            loss = -logit_difference(full_logits(model, examples, PAD), examples).mean()
            loss.backward()
            sq = 0.0
            with torch.no_grad():
                for name, p in params.items():
                    if name in keep:  # the naive way: the full gradient, masked to the rows afterwards
                        g = p.grad * keep[name]
                        sq += (g.float() ** 2).sum().item()
                        p -= LR * g
            return loss.item(), sq ** 0.5
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        reset = reset_peak_rss()
    times, first = [], None
    for _ in range(args.reps + 1):  # the first (untimed) step allocates the gradients
        start = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        first = first or out
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    print(json.dumps({"variant": args.variant, "params": n_params, "trainable": trainable,
                      "rows": sum(len(r) for r in rows.values()), "peak_bytes": peak,
                      "median_s": statistics.median(times[1:]), "first_loss": first[0],
                      "first_row_grad_norm": first[1],
                      "peak_source": "cuda" if cuda else ("VmHWM reset" if reset else "ru_maxrss")}))


# ---------------------------------------------------------------- driver


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", args.model,
           "--length", str(args.length), "--batch", str(args.batch), "--reps", str(args.reps),
           "--device", args.device, "--dtype", args.dtype, "--fraction", str(args.fraction)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--large", action="store_true", help="the ~1.6B model instead (meant for cuda)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--length", type=int, default=None, help="prefix length (default 256 cpu, 1024 cuda)")
    parser.add_argument("--batch", type=int, default=None, help="prefixes per step (default 4 cpu, 8 cuda)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps after one warm-up")
    parser.add_argument("--fraction", type=float, default=0.02, help="selected fraction of each kind")
    parser.add_argument("--worker", choices=["rows", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.model = args.model or ("tiny" if args.quick else "large" if args.large else "medium")
    args.length = args.length or (64 if args.quick else 1024 if gpu else 256)
    args.batch = args.batch or (4 if args.quick or not gpu else 8)
    args.reps = args.reps or (3 if args.quick or gpu else 2)
    if args.worker:
        args.variant = args.worker
        worker(args)
        return
    cfg = MODELS[args.model]
    print(f"device {args.device}, dtype {args.dtype}, model {args.model} ({cfg['num_hidden_layers']} layers, "
          f"hidden {cfg['hidden_size']}, inter {cfg['intermediate_size']}), batch {args.batch} x "
          f"~{args.length} tokens, {args.fraction:.0%} of each component kind selected, plain SGD lr {LR}; "
          f"median of {args.reps} steps after a warm-up; each variant in a fresh process")
    results = {v: run_variant(args, v) for v in ("rows", "full")}
    r, f = results["rows"], results["full"]
    weights = r["params"] * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"params {r['params'] / 1e6:.1f}M ({weights / 2**20:.0f} MiB of weights), selected rows "
          f"{r['rows']}; peak memory from {r['peak_source']}")
    for name, res in (("rows (RowDeltas)", r), ("full grad + mask", f)):
        print(f"  {name:17s} trainable {res['trainable'] / 1e6:9.3f}M | peak step memory "
              f"{res['peak_bytes'] / 2**20:8.0f} MiB | step {res['median_s'] * 1e3:9.1f} ms | "
              f"loss {res['first_loss']:.5f} | row grad norm {res['first_row_grad_norm']:.5e}")
    print(f"ratio (full / rows): trainable {f['trainable'] / r['trainable']:.0f}x, "
          f"peak memory {f['peak_bytes'] / max(r['peak_bytes'], 1):.2f}x, step time "
          f"{f['median_s'] / r['median_s']:.2f}x")


if __name__ == "__main__":
    main()
