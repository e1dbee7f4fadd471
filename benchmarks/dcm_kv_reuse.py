"""DCM mask step: full recompute of every prefix vs KV reuse (prefix[:-1] cached once), side by side,
and the KV memory held with and without the shared prompt.

One step = forward at the last position under scaled() with masks 2m, loss -mean(logit diff) +
lambda * sum(m), backward to the masks. Full recompute runs the whole left-padded prefix each step;
KV reuse (PrefixCache) runs only the last token against a cache built once (its build time is printed
but not counted in the step). The prefixes are a few-shot prompt all of them share (--shared, default
85% of the length) followed by each example's own tokens, as in CCA's 8-shot prompts: the cache holds
that prompt once ("shared") or once per example ("per-example"), and both are timed. Random-initialised
Llama models: a small one like the built-in model and one of ~300M parameters (--large: ~1.6B, meant
for a GPU in bf16).

    .venv/bin/python benchmarks/dcm_kv_reuse.py [--quick] [--device cuda] [--large] [--shared 0.85]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cca_ray.components import KINDS, component_space, scaled
from cca_ray.dcm import Example, PrefixCache, full_logits, logit_difference
from cca_ray.dcm.batches import SHARE_MIN

PAD = 0
LAMBDA = 0.01


@dataclass
class Setup:
    """One model size and the prefix lengths / batch sizes / repetitions it is timed at."""

    name: str
    config: dict
    runs: list[tuple[int, int, int]]  # (prefix length, batch size, timed repetitions)


SMALL = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=1000)
MEDIUM = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=8, head_dim=64, vocab_size=32000)
LARGE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, vocab_size=200)


def setups(args: argparse.Namespace) -> list[Setup]:
    """What to time. On CPU (2 cores) the 300M model runs batch 8 up to 1024 tokens (a full-recompute
    step of 8 x 2048 tokens would take over a minute and ~15 GB) and two repetitions."""
    if args.quick:
        return [Setup("tiny", TINY, [(64, 4, 3), (256, 4, 3)])]
    gpu = args.device == "cuda"
    medium = [(512, 8, 5), (1024, 8, 5), (2048, 8, 5)] if gpu else [(512, 8, 2), (1024, 8, 2)]
    out = [Setup("small (built-in size)", SMALL, [(128, 8, 10), (512, 8, 10)]),
           Setup("medium", MEDIUM, medium)]
    if args.large:
        out.append(Setup("large", LARGE, [(512, 8, 5), (2048, 8, 3)] if gpu else [(512, 2, 1)]))
    return out


def make_model(config: dict, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A seeded random-initialised Llama, frozen (DCM trains only the masks)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=4096))
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_examples(n: int, length: int, vocab: int, shared: float, seed: int = 0) -> list[Example]:
    """Prefixes of 90-100% of `length` tokens (uneven, so left padding is exercised) whose first
    ``shared`` fraction of `length` is one prompt common to all."""
    rng = random.Random(seed)
    prompt = [rng.randrange(1, vocab) for _ in range(int(shared * length))]
    out = []
    for _ in range(n):
        own = rng.randint(int(0.9 * length), length) - len(prompt)
        ids = prompt + [rng.randrange(1, vocab) for _ in range(max(own, 2))]
        desired, undesired = rng.sample(range(1, vocab), 2)
        out.append(Example(ids, desired, undesired))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mask_step(model, masks: dict[str, torch.Tensor], batch: list[Example],
              logits_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One DCM step without the optimizer: scaled forward, loss, backward to the masks."""
    for m in masks.values():
        m.grad = None
    with scaled(model, {k: 2 * m for k, m in masks.items()}):
        logits = logits_fn()
    loss = -logit_difference(logits, batch).mean() + LAMBDA * sum(m.sum() for m in masks.values())
    loss.backward()
    return logits.detach()


def timed(fn: Callable[[], torch.Tensor], reps: int, device: str) -> tuple[float, float, torch.Tensor]:
    """(median seconds, peak extra GPU bytes or 0, last result) over reps after one untimed warm-up."""
    out = fn()
    times = []
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    return statistics.median(times), peak, out


def bench_run(model, masks: dict[str, torch.Tensor], length: int, batch_size: int, reps: int,
              vocab: int, device: str, shared: float) -> None:
    """Time the three ways on one batch of prefixes and print one block."""
    examples = make_examples(batch_size, length, vocab, shared)
    idx = list(range(batch_size))
    full_s, full_mem, full_out = timed(
        lambda: mask_step(model, masks, examples, lambda: full_logits(model, examples, PAD)), reps, device)
    caches, rows = {}, []
    for name, share_min in (("per-example", 10**9), ("shared", SHARE_MIN)):
        sync(device)
        t0 = time.perf_counter()
        cache = PrefixCache(model, examples, PAD, batch_size=batch_size, share_min=share_min)
        sync(device)
        build_s = time.perf_counter() - t0
        kv_s, kv_mem, kv_out = timed(lambda c=cache: mask_step(model, masks, examples, lambda: c.logits(idx)),
                                     reps, device)
        caches[name] = cache
        diff = (full_out - kv_out).abs().max().item()
        mem = f", peak step {kv_mem / 2**20:.0f} MiB" if device == "cuda" else ""
        rows.append(f"    KV reuse, {name:11s} {kv_s * 1e3:8.1f} ms/step | ratio {full_s / kv_s:6.1f}x | "
                    f"KV held {cache.stored_bytes() / 2**20:8.1f} MiB | build {build_s * 1e3:.0f} ms "
                    f"(= {build_s / kv_s:.1f} steps) | max |logit diff| vs full {diff:.1e}{mem}")
    note = "" if batch_size == 8 else f" (batch {batch_size}, not 8: {device} time/memory)"
    full_mem_s = f", peak step {full_mem / 2**20:.0f} MiB" if device == "cuda" else ""
    held = caches["per-example"].stored_bytes() / caches["shared"].stored_bytes()
    shared_n = caches["shared"].shared_length
    print(f"  prefix ~{length} ({shared_n} shared), batch {batch_size}, reps {reps}{note}\n"
          f"    full recompute       {full_s * 1e3:8.1f} ms/step{full_mem_s}\n" + "\n".join(rows) +
          f"\n    KV memory per-example / shared: {held:.1f}x")


def bench_setup(setup: Setup, device: str, dtype: torch.dtype, shared: float) -> None:
    """Build one model and time it at each of its (length, batch, reps)."""
    start = time.perf_counter()
    model = make_model(setup.config, device, dtype)
    space = component_space(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{setup.name}: {n_params / 1e6:.1f}M params ({setup.config['num_hidden_layers']} layers, "
          f"hidden {setup.config['hidden_size']}), {space.total} components; "
          f"built in {time.perf_counter() - start:.1f} s")
    masks = {k: torch.full(space.shape(k), 0.75, device=device, requires_grad=True) for k in KINDS}
    for length, batch_size, reps in setup.runs:
        bench_run(model, masks, length, batch_size, reps, setup.config["vocab_size"], device, shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short prefixes: a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--large", action="store_true", help="add a ~1.6B model (meant for --device cuda)")
    parser.add_argument("--shared", type=float, default=0.85, help="fraction of the prefix all share")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    print(f"device {args.device}, dtype {str(dtype).removeprefix('torch.')}, torch threads "
          f"{torch.get_num_threads()}; step = scaled forward at the last position + loss + backward to "
          f"the masks; median of the timed repetitions after one warm-up")
    start = time.perf_counter()
    for setup in setups(args):
        bench_setup(setup, args.device, dtype, args.shared)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
