"""Are a run's pivots causal? Force each pivot's desired and undesired token after its prefix,
continue greedily, and score the final answer.

A pivot where the desired token leads to the right answer and the undesired one to a wrong
answer is one where promoting the token can fix the problem; a pivot where both lead to the same
outcome is a difference of wording, and promoting it teaches style, not arithmetic. Prints the
shares overall and per pivot kind (operation / arithmetic / other), and a few examples.
(uses the run's config.yaml and its stages: the pivots are reused, nothing is recomputed)

    .venv/bin/python benchmarks/pivot_forcing.py --run runs/smollm2 [--examples 6]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def main() -> None:
    from cca_ray.data.answers import is_correct
    from cca_ray.localize.pivots import pivot_kind
    from cca_ray.pipeline.run import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `cca-ray run` output folder")
    ap.add_argument("--examples", type=int, default=6, help="pivots to print in full")
    args = ap.parse_args()
    run = Path(args.run)
    pipe = Pipeline.reopen(run)  # its stages, reused
    prep = pipe.prepare()
    tok = pipe.m.tokenizer
    gold = {p.key: p.gold for p in prep.splits.train}
    pivots = prep.pivots + prep.heldout
    sampler = pipe.engines.gen_sampler()
    seqs = [p.prefix["token_ids"] + [t] for p in pivots for t in (p.desired_token, p.undesired_token)]
    answer_start = "A: Let's think step by step."

    def forced(seq: list[int]) -> str:
        """The answer so far: the text after the prompt's last 'A:' up to the forced token."""
        text = tok.decode(seq, skip_special_tokens=True)
        return text[text.rfind(answer_start) + len(answer_start):]

    heads = [forced(s) for s in seqs]
    outs = sampler.generate_ids(seqs, max_new_tokens=pipe.config.evaluation.max_new_tokens,
                                prefix_texts=heads)  # the stop rule sees the forced part too

    def trace(i: int) -> str:
        return heads[i] + outs[i][0].text

    rows = []
    for i, p in enumerate(pivots):
        traces = [trace(2 * i + j) for j in (0, 1)]
        right = [is_correct(t, gold[(p.template_id, p.instance_id)]) for t in traces]
        sides = [tok.decode([t]).strip() for t in (p.desired_token, p.undesired_token)]
        rows.append((p, pivot_kind(p, tok), sides, right, traces))
    table: dict[str, Counter] = {}
    for _, kind, _, (d, u), _ in rows:
        for k in (kind, "all"):
            table.setdefault(k, Counter())[(d, u)] += 1
    print(f"{len(rows)} pivots ({len(prep.pivots)} train, {len(prep.heldout)} held out); greedy "
          "continuation after forcing each side:\n")
    print("| kind | pivots | desired right, undesired wrong (causal) | both right | both wrong | "
          "desired wrong, undesired right |")
    print("|---|---|---|---|---|---|")
    for kind in ("operation", "arithmetic", "other", "all"):
        c = table.get(kind, Counter())
        n = sum(c.values())
        if n:
            pct = {k: f"{c[k]} ({100 * c[k] / n:.0f}%)" for k in c | {(True, False): 0, (True, True): 0,
                                                                       (False, False): 0, (False, True): 0}}
            print(f"| {kind} | {n} | {pct[(True, False)]} | {pct[(True, True)]} | {pct[(False, False)]} | "
                  f"{pct[(False, True)]} |")
    print("\nexamples:")
    for p, kind, sides, right, traces in rows[: args.examples]:
        verdict = ["right" if r else "wrong" for r in right]
        print(f"- {p.template_id}/{p.instance_id} {kind}: desired {sides[0]!r} -> {verdict[0]}, "
              f"undesired {sides[1]!r} -> {verdict[1]}")
        print(f"    desired:   {' '.join(traces[0].split())[:220]}")
        print(f"    undesired: {' '.join(traces[1].split())[:220]}")
    sampler.close()


if __name__ == "__main__":
    main()
