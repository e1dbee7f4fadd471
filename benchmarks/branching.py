"""Branching localisation, three ways on the same traces of the built-in model: the naive scan
(one greedy completion per position, in order), the batched scan (chunks of positions of all
traces per call; the same pivots) and bisection (binary search for a flip, then the neighbours).
Prints generated tokens, completions, wall time and pivot agreement with the naive scan, side by
side in one run.

    .venv/bin/python benchmarks/branching.py [--problems 80] [--backend vllm|hf]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=80, help="training problems to trace")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--chunk", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cca_ray.data.prompts import build_prompt
    from cca_ray.localize import localize
    from cca_ray.sampling import make_sampler
    from cca_ray.sampling.traces import collect_traces
    from cca_ray.tiny.build import BuildSettings, ensure_built, world_data

    path = ensure_built()
    tok = AutoTokenizer.from_pretrained(path)
    if args.backend == "hf":
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        sampler = make_sampler("hf", model=model, tokenizer=tok, batch_size=64,
                               max_new_tokens=args.max_new_tokens, progress=False)
    else:
        sampler = make_sampler("vllm", path, tokenizer=tok, max_new_tokens=args.max_new_tokens,
                               progress=False)
    _, held_out, splits, _ = world_data(BuildSettings(), progress=False)
    train = [p for p in splits.train if p.id not in held_out][:: max(1, len(splits.train) // 2000)]
    problems = train[: args.problems * 3]
    traces = collect_traces(sampler, problems, [build_prompt(p.question, 0) for p in problems], 10, 1.0, 0,
                            args.max_new_tokens)
    traces = [t for t in traces if t.contrast_ids is not None][: args.problems]
    mean_len = sum(len(t.contrast_ids) for t in traces) / len(traces)
    print(f"built-in model, {args.backend} backend, {len(traces)} traces with a contrasting sample "
          f"(mean sampled length {mean_len:.1f} tokens)")

    results = {}
    for method in ("branching", "branching-batched", "branching-bisect"):
        start = time.perf_counter()
        loc = localize(method, traces, sampler, max_new_tokens=args.max_new_tokens, chunk=args.chunk,
                       progress=False)
        results[method] = (loc, time.perf_counter() - start)

    naive, naive_s = results["branching"]
    naive_pos = {(p.template_id, p.instance_id): (p.position, p.desired_token, p.undesired_token)
                 for p in naive.pivots}
    print(f"\n{'method':20} {'pivots':>6} {'completions':>11} {'gen tokens':>10} {'wall s':>8} "
          f"{'tokens vs naive':>15} {'wall vs naive':>13} {'agree w/ naive':>14}")
    for method, (loc, secs) in results.items():
        same = sum(naive_pos.get((p.template_id, p.instance_id)) == (p.position, p.desired_token,
                                                                    p.undesired_token) for p in loc.pivots)
        agree = same / max(1, len(naive_pos))
        print(f"{method:20} {len(loc.pivots):6d} {loc.completions:11d} {loc.generated_tokens:10d} "
              f"{secs:8.1f} {naive.generated_tokens / max(1, loc.generated_tokens):14.2f}x "
              f"{naive_s / secs:12.2f}x {100 * agree:13.1f}%")
    print("\n'tokens vs naive' = naive's generated tokens / this method's (higher = fewer tokens); "
          "'agree' = same pivot position and tokens as the naive scan.")
    sampler.close()


if __name__ == "__main__":
    main()
