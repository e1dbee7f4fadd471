"""The GPU check: what a session with an accelerator measures in one run (under 8 minutes on one H100
or H200), with only torch + transformers + this project importable (no ray, vLLM or DeepSpeed there).
On a random-initialised ~1.6B Llama in bf16 (hidden 2048, 24 layers, GQA 16/8 heads):

  1. DCM mask step, full recompute vs KV reuse (shared few-shot prompt), at prefix 1024 and 2048,
     batch 8: ms per step, speed-up, KV memory held per-example vs shared, peak step memory;
  2. update step peak memory: the targeted row update (2% of the components), with activation
     checkpointing, against full fine-tuning with AdamW and against LoRA (r 16), same batch;
  3. HF greedy sampling throughput (64 prompts x 128 new tokens).

It prints one table at the end. Run it through benchmarks/gpu_check.sh (sets PYTHONPATH).

    python3 benchmarks/gpu_check.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dcm_kv_reuse as dcm  # noqa: E402 (the benchmark beside this file)
import targeted_update as upd  # noqa: E402

from cca_ray.components import KINDS, component_space  # noqa: E402
from cca_ray.dcm import PrefixCache, full_logits  # noqa: E402
from cca_ray.dcm.batches import SHARE_MIN  # noqa: E402

MODEL = upd.MODELS["large"]  # hidden 2048, 24 layers, GQA 16/8 heads of 128, vocab 32000: ~1.6B
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=500)

Row = tuple[str, str, str]  # (check, what, value)


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def dcm_rows(config: dict, device: str, dtype: torch.dtype, lengths: list[int], reps: int) -> list[Row]:
    """Full recompute vs KV reuse (shared prompt) per prefix length, batch 8."""
    model = dcm.make_model(config, device, dtype)
    space = component_space(model)
    masks = {k: torch.full(space.shape(k), 0.75, device=device, requires_grad=True) for k in KINDS}
    rows: list[Row] = []
    for length in lengths:
        examples = dcm.make_examples(8, length, config["vocab_size"], shared=0.85)
        idx = list(range(8))
        full_s, full_mem, full_out = dcm.timed(
            lambda ex=examples: dcm.mask_step(model, masks, ex, lambda: full_logits(model, ex, dcm.PAD)),
            reps, device)
        per_example = PrefixCache(model, examples, dcm.PAD, batch_size=8, share_min=10**9)
        shared = PrefixCache(model, examples, dcm.PAD, batch_size=8, share_min=SHARE_MIN)
        def kv_step(ex=examples, c=shared, i=idx) -> torch.Tensor:
            return dcm.mask_step(model, masks, ex, lambda: c.logits(i))

        kv_s, kv_mem, kv_out = dcm.timed(kv_step, reps, device)
        diff = (full_out - kv_out).abs().max().item()
        name = f"DCM prefix {length}"
        rows += [(name, "full recompute ms/step", f"{full_s * 1e3:.1f}"),
                 (name, "KV reuse ms/step", f"{kv_s * 1e3:.2f}"),
                 (name, "speed-up", f"{full_s / kv_s:.0f}x"),
                 (name, "KV held per-example / shared MiB",
                  f"{per_example.stored_bytes() / 2**20:.0f} / {shared.stored_bytes() / 2**20:.0f}"),
                 (name, "peak step MiB full / KV", f"{full_mem / 2**20:.0f} / {kv_mem / 2**20:.0f}"),
                 (name, "max |logit diff| full vs KV", f"{diff:.1e}")]
        del per_example, shared
        free(device)
    return rows  # the model goes with this frame; the caller frees the device memory


def update_rows(model: str, device: str, dtype: str, length: int) -> list[Row]:
    """Peak step memory of each update variant (each in its own process), relative to full AdamW."""
    args = argparse.Namespace(model=model, length=length, batch=8, reps=2, device=device, dtype=dtype,
                              fraction=0.02)
    results = {v: upd.run_variant(args, v) for v in upd.VARIANTS}
    full = results["full_adamw"]["peak_bytes"]
    rows: list[Row] = []
    for variant, res in results.items():
        rows.append((f"update 8 x {length}", f"{variant} peak MiB (/ full AdamW)",
                     f"{res['peak_bytes'] / 2**20:.0f} ({res['peak_bytes'] / full:.2f})"))
    return rows


def sampling_rows(config: dict, device: str, dtype: torch.dtype, prompts: int, new_tokens: int) -> list[Row]:
    """HF greedy generation throughput on a random model with a small word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cca_ray.data.prompts import build_prompt
    from cca_ray.sampling import HFSampler
    from cca_ray.tiny.tokenizer import train_tokenizer

    rng = random.Random(0)
    questions = [f"Ana has {rng.randint(2, 99)} apples and buys {rng.randint(2, 99)} more."
                 for _ in range(prompts)]
    tokenizer = train_tokenizer([build_prompt(q, 0) for q in questions])  # zero-shot: no lm-eval there
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{**config, "vocab_size": len(tokenizer)},
                                             max_position_embeddings=4096))
    model = model.to(dtype).eval()
    sampler = HFSampler(model, tokenizer, batch_size=prompts, max_new_tokens=new_tokens, progress=False)
    ids = [tokenizer(build_prompt(q, 0), add_special_tokens=False)["input_ids"] for q in questions]
    sampler.generate_ids(ids[:2], max_new_tokens=4)  # warm-up
    dcm.sync(device)
    start = time.perf_counter()
    out = sampler.generate_ids(ids)
    dcm.sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o[0].token_ids) for o in out)
    del model, sampler
    free(device)
    return [(f"HF sampling {prompts} x {new_tokens}", "generated tokens/s", f"{tokens / seconds:.0f}"),
            (f"HF sampling {prompts} x {new_tokens}", "tokens, seconds", f"{tokens}, {seconds:.1f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a tiny model and short prefixes: a smoke run")
    args = parser.parse_args()
    start = time.perf_counter()
    quick = args.quick
    config = QUICK if quick else MODEL
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows: list[Row] = []
    for part, fn in (
        ("DCM", lambda: dcm_rows(config, args.device, dtype, [128, 256] if quick else [1024, 2048],
                                 2 if quick else 5)),
        ("update", lambda: update_rows("tiny" if quick else "large", args.device, name,
                                       64 if quick else 1024)),
        ("sampling", lambda: sampling_rows(config, args.device, dtype, 8 if quick else 64,
                                           16 if quick else 128)),
    ):
        t0 = time.perf_counter()
        try:
            rows += fn()
            free(args.device)
        except Exception as err:  # one failed part must not lose the others' numbers
            rows.append((part, "FAILED", f"{type(err).__name__}: {str(err)[:200]}"))
        print(f"[{part}: {time.perf_counter() - t0:.0f} s]", flush=True)
    print(f"\nGPU check on {device_name}, {name}, torch {torch.__version__}; random Llama hidden "
          f"{config['hidden_size']}, {config['num_hidden_layers']} layers, vocab {config['vocab_size']}")
    width = max(len(r[0]) + len(r[1]) for r in rows) + 3
    for check, what, value in rows:
        print(f"  {check + ' | ' + what:{width}s} {value}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
