"""Targeted update step vs real full fine-tuning (AdamW) and LoRA: peak step memory, same model, same batch.

One step = forward over a batch of prefixes, loss -mean(logit diff), backward, an optimizer step. The
variants, each in a fresh subprocess:

  full_adamw       real full fine-tuning: every parameter trainable, torch AdamW over all of them
                   (foreach=False: the per-parameter loop, no foreach temporaries), a step each step:
                   gradients and both AdamW states count in the peak (allocated by the warm-up step and
                   kept, so every measured step's peak includes them)
  lora             peft LoRA r=16, alpha=32 on q/k/v/o/gate/up/down_proj, AdamW on the adapters
  full             every parameter requires grad, the full gradient is masked to the rows afterwards
                   and applied with plain SGD (the naive targeted update; no optimizer states)
  rows             the targeted update as `cca_ray.update.targeted_update` runs it: RowDeltas (the base
                   weights never get a gradient), plain SGD, the whole batch in one forward
  rows_ckpt        rows with activation checkpointing (`update.gradient_checkpointing`)
  rows_micro       rows in micro-batches of 1 with gradient accumulation (`update.micro_batch_size: 1`)
  rows_micro_ckpt  both

The selected rows are ~2% of the components (Q/K/V heads and MLP neurons). The baseline is taken after
the model, the adapters or deltas and the optimizer exist but before the first (warm-up) step. CPU
memory is peak RSS minus that baseline (the peak is reset through /proc/self/clear_refs where the kernel
allows, else ru_maxrss; the workers run with a fixed glibc mmap threshold so freed large buffers leave
the RSS and a step cannot hide in memory the model load freed); CUDA memory is max_memory_allocated
minus the allocation at the baseline.

    .venv/bin/python benchmarks/targeted_update.py [--quick] [--device cuda] [--large] [--length N]
"""

from __future__ import annotations

import argparse
import json
import os
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
from cca_ray.update.sft import LORA_TARGETS
from cca_ray.update.train import accumulate, checkpointing, micro_batches

PAD = 0
LR = 1e-4
VARIANTS = ("full_adamw", "lora", "full", "rows", "rows_ckpt", "rows_micro", "rows_micro_ckpt")
TARGETED = ("rows", "rows_ckpt", "rows_micro", "rows_micro_ckpt")
GOAL = 1 / 3  # targeted update peak / full fine-tuning (AdamW) peak
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


def row_grad_norm(params: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> float:
    """The gradient's norm on the selected rows (the same for every variant that has full gradients)."""
    with torch.no_grad():
        return sum((params[n].grad[r].float() ** 2).sum().item() for n, r in rows.items()) ** 0.5


def worker(args: argparse.Namespace) -> None:
    model, rows, examples = build(args)
    cuda = args.device == "cuda"
    n_params = sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    rows = {n: r.to(args.device) for n, r in rows.items()}
    variant = args.variant
    if variant in TARGETED:
        for p in model.parameters():
            p.requires_grad_(False)
        deltas = RowDeltas(model, rows)
        trainable = deltas.parameter_count()
        micro = micro_batches(examples, 1 if "micro" in variant else len(examples))
        ckpt = variant.endswith("ckpt")

        def step() -> tuple[float, float]:  # the step of cca_ray.update.targeted_update (plain SGD)
            deltas.zero_grad(set_to_none=True)
            with deltas.attached(), checkpointing(model, ckpt):
                loss = accumulate(model, micro, PAD, len(examples))
            norm = torch.sqrt(sum((d.grad.float() ** 2).sum() for d in deltas.deltas)).item()
            with torch.no_grad():
                for d in deltas.deltas:
                    d -= LR * d.grad
            return loss, norm
    elif variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = n_params
        keep = {}
        for name, r in rows.items():
            keep[name] = torch.zeros(params[name].shape[0], 1, dtype=torch.bool, device=args.device)
            keep[name][r] = True

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
    elif variant == "full_adamw":
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = n_params
        opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)

        def step() -> tuple[float, float]:  # plain full fine-tuning: the states come with the 1st step
            opt.zero_grad(set_to_none=True)
            loss = -logit_difference(full_logits(model, examples, PAD), examples).mean()
            loss.backward()
            norm = row_grad_norm(params, rows)
            opt.step()
            return loss.item(), norm
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=list(LORA_TARGETS)))
        adapters = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in adapters)
        opt = torch.optim.AdamW(adapters, lr=LR, foreach=False)

        def step() -> tuple[float, float]:
            opt.zero_grad(set_to_none=True)
            loss = -logit_difference(full_logits(model, examples, PAD), examples).mean()
            loss.backward()
            opt.step()
            return loss.item(), float("nan")
    else:
        raise SystemExit(f"unknown variant {variant}")
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
    print(json.dumps({"variant": variant, "params": n_params, "trainable": trainable,
                      "rows": sum(len(r) for r in rows.values()), "peak_bytes": peak,
                      "median_s": statistics.median(times[1:]), "first_loss": first[0],
                      "first_row_grad_norm": first[1],
                      "peak_source": "cuda" if cuda else ("VmHWM reset" if reset else "ru_maxrss")}))


# ---------------------------------------------------------------- driver


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", args.model,
           "--length", str(args.length), "--batch", str(args.batch), "--reps", str(args.reps),
           "--device", args.device, "--dtype", args.dtype, "--fraction", str(args.fraction)]
    # a fixed mmap threshold (glibc's adapts otherwise): every large buffer is mmapped and returned on
    # free, so the RSS follows what is live and a step cannot reuse heap the model load left resident
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="which to run (default: all; full_adamw is the reference of the ratios)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
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
          f"~{args.length} tokens, {args.fraction:.0%} of each component kind selected, lr {LR}; "
          f"median of {args.reps} steps after a warm-up; each variant in a fresh process", flush=True)
    results = {}
    for v in args.variants:
        results[v] = run_variant(args, v)
        print(f"  ran {v}: peak {results[v]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    any_res = next(iter(results.values()))
    weights = any_res["params"] * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"params {any_res['params'] / 1e6:.1f}M ({weights / 2**20:.0f} MiB of weights, not counted: "
          f"loaded before the baseline), selected rows {any_res['rows']}; peak memory from "
          f"{any_res['peak_source']}")
    ref = results.get("full_adamw")
    print(f"  {'variant':16s} {'trainable':>12s} | {'peak step MiB':>13s} | {'step ms':>9s} | "
          f"{'peak / full_adamw':>17s} | {'first loss':>10s} | row grad norm")
    for name, res in results.items():
        ratio = f"{res['peak_bytes'] / ref['peak_bytes']:17.3f}" if ref else f"{'-':>17s}"
        print(f"  {name:16s} {res['trainable']:12,d} | {res['peak_bytes'] / 2**20:13.0f} | "
              f"{res['median_s'] * 1e3:9.1f} | {ratio} | {res['first_loss']:10.5f} | "
              f"{res['first_row_grad_norm']:.5e}")
    losses = [res["first_loss"] for res in results.values()]
    spread = max(losses) - min(losses)
    print(f"first loss: the same in every variant up to {spread:.2e} "
          f"({'ok' if spread <= 1e-4 * max(1.0, abs(losses[0])) else 'MISMATCH'})")
    if ref:
        for name in [v for v in results if v != "full_adamw"]:
            ratio = results[name]["peak_bytes"] / ref["peak_bytes"]
            met = "met" if ratio <= GOAL else "NOT met"
            goal = f" (goal <= {GOAL:.2f}: {met})" if name in TARGETED else ""
            print(f"{name} / full_adamw = {ratio:.3f}{goal}; step time "
                  f"{results[name]['median_s'] / ref['median_s']:.2f}x")
        targeted = [v for v in results if v in TARGETED]
        best = min(targeted, key=lambda v: results[v]["peak_bytes"], default=None)
        if best:
            print(f"lowest targeted peak: {best} / full_adamw = "
                  f"{results[best]['peak_bytes'] / ref['peak_bytes']:.3f} (goal <= {GOAL:.2f})")


if __name__ == "__main__":
    main()
