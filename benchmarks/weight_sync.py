"""Bytes one validation pushes into the inference engine: delta-only sync vs whole weights, side by side.

On a random-initialised ~317M Llama (the `medium` model of the other benchmarks): CCA's row update of
2% of the components (Q/K/V heads and MLP neurons) sends its changed rows; before, every validation
sent each touched parameter whole, and vLLM got the whole fused qkv_proj / gate_up_proj it lives in.
A LoRA baseline (r 16 on every linear) sends its factors instead of the merged weights. Bytes are
what `vllm_sync.sync_ops` puts on the RPC (tensor data). With --engine the pushes also run into a
real vLLM engine (the CPU build here: minutes to start on 2 cores) and are timed.

    .venv/bin/python benchmarks/weight_sync.py [--quick] [--engine]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dcm_kv_reuse import MEDIUM, TINY  # noqa: E402

from cca_ray.components import KINDS, component_space  # noqa: E402
from cca_ray.io import checkpoint_reader  # noqa: E402
from cca_ray.sampling.vllm_sync import op_bytes, sync_ops, vllm_module  # noqa: E402
from cca_ray.sampling.weights import LowRank  # noqa: E402
from cca_ray.tiny.tokenizer import train_tokenizer  # noqa: E402
from cca_ray.update import RowDeltas, selected_rows  # noqa: E402
from cca_ray.update.sft import LORA_TARGETS  # noqa: E402


def updates(model, fraction: float, rank: int) -> dict[str, dict]:
    """The four ways one validation's weights can be sent."""
    space = component_space(model)
    gen = torch.Generator().manual_seed(1)
    selected = {k: torch.rand(space.shape(k), generator=gen) < fraction for k in KINDS}
    deltas = RowDeltas(model, selected_rows(model, space, selected))
    with torch.no_grad():
        for d in deltas.deltas:
            d.normal_(0, 1e-3, generator=gen)
    rows = deltas.merged_rows()
    whole = deltas.merged_weights()  # the touched parameters, whole: what a validation pushed before
    params = dict(model.named_parameters())
    fused = {}  # ... and what vLLM then received: every part of each touched fused module
    for name in whole:
        for part in vllm_module(name)[1]:
            fused[part] = whole.get(part, params[part].detach())
    lora = {}
    for name, p in params.items():
        if name.rsplit(".", 2)[-2] in LORA_TARGETS:
            out_dim, in_dim = p.shape
            lora[name] = LowRank(torch.randn(rank, in_dim, generator=gen) * 1e-2,
                                 torch.randn(out_dim, rank, generator=gen) * 1e-2, 2.0)
    merged = {n: p.detach() for n, p in params.items() if n in lora}
    return {"rows (delta-only)": rows, "touched weights whole (before)": fused,
            "LoRA factors (delta-only)": lora, "LoRA merged weights (before)": merged}


def engine_times(path: Path, ways: dict[str, dict], reps: int) -> dict[str, float]:
    """Median seconds per push into a real vLLM engine, each followed by a reset to the checkpoint."""
    from cca_ray.sampling.vllm_backend import VLLMSampler

    sampler = VLLMSampler(path, max_new_tokens=4, progress=False, max_model_len=256)
    out = {}
    try:
        for name, update in ways.items():
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                sampler.push_weights(update)
                times.append(time.perf_counter() - start)
                sampler.push_weights(dict.fromkeys(update))
            out[name] = statistics.median(times)
    finally:
        sampler.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    parser.add_argument("--engine", action="store_true", help="also time the pushes into a real vLLM")
    parser.add_argument("--fraction", type=float, default=0.02, help="selected fraction of each kind")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TINY if args.quick else MEDIUM
    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=4096)).float().eval()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        train_tokenizer(["a few words for the engine's tokenizer"]).save_pretrained(tmp)  # vLLM loads one
        shape = checkpoint_reader(tmp).shape
        ways = updates(model, args.fraction, rank=16)
        print(f"random Llama {n_params / 1e6:.0f}M params (hidden {config['hidden_size']}, "
              f"{config['num_hidden_layers']} layers), float32; {args.fraction:.0%} of each component kind "
              f"selected; LoRA r 16 on every linear")
        sent = {name: op_bytes(sync_ops(shape, update)) for name, update in ways.items()}
        times = engine_times(Path(tmp), ways, reps=3) if args.engine else {}
        for name, b in sent.items():
            t = f" | push {times[name] * 1e3:8.1f} ms" if name in times else ""
            print(f"  {name:32s} {b / 2**20:10.2f} MiB per validation ({len(ways[name])} tensors){t}")
        rows = sent["touched weights whole (before)"] / sent["rows (delta-only)"]
        lora = sent["LoRA merged weights (before)"] / sent["LoRA factors (delta-only)"]
        print(f"ratio (before / delta-only): rows {rows:.1f}x, LoRA {lora:.1f}x; "
              f"the whole model is {n_params * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
