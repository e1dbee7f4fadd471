"""Does DCM's selection matter? Probes that tell a localisation that transfers from one that does
not, for CCA's selection against random selections of the same size per kind:

1. scaling: the change of the mean logit difference (desired - undesired) on the DCM-train and the
   held-out pivots when the selected components are doubled (x2) or ablated (x0) at the pivot;
2. update direction: per kind, the gradient of the mean logit difference w.r.t. the selected rows
   on (a seeded subset of) the train pivots and on the held-out pivots, their norms and cosine. A
   cosine near 0 means a step that raises the train pivots' difference does not move the held-out
   ones: the update memorises instead of amplifying a shared circuit.

    python benchmarks/selection_probe.py --run runs/default
(uses the run's config.yaml and its stages: the pivots, their split and the DCM mask are reused)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from cca_ray.components import KINDS, component_space, scaled
    from cca_ray.dcm import Example
    from cca_ray.dcm.batches import full_logits, logit_difference
    from cca_ray.pipeline.run import Pipeline, pivot_examples
    from cca_ray.pipeline.updates import update_subset
    from cca_ray.update import RowDeltas, selected_rows
    from cca_ray.update.control import random_selection
    from cca_ray.update.diagnostics import logit_differences
    from cca_ray.update.train import micro_batches

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `cca-ray run` output folder")
    ap.add_argument("--seeds", type=int, default=3, help="random selections to compare")
    args = ap.parse_args()
    run = Path(args.run)
    pipe = Pipeline.reopen(run)  # its stages, reused
    config = pipe.config
    prep = pipe.prepare()
    mask = pipe.dcm(prep)
    model, pad = pipe.m.model, pipe.m.tokenizer.pad_token_id
    train, held = prep.pivots, prep.heldout
    step_set = update_subset(train, config.update.max_examples)

    examples = pivot_examples
    cca = mask.selected
    selections = [("cca", cca)] + [(f"random{s}", random_selection(cca, s)) for s in range(args.seeds)]
    print(f"{len(train)} DCM-train pivots ({len(step_set)} per update step), {len(held)} held out; "
          f"selected per kind: { {k: int(v.sum()) for k, v in cca.items()} }")

    sets = {"train": examples(train), "held": examples(held)}
    base = {n: logit_differences(model, ex, pad, 64).mean().item() for n, ex in sets.items()}
    print(f"base mean logit difference: train {base['train']:+.3f}, held-out {base['held']:+.3f}\n")
    print("scaling (change of the mean logit difference)")
    for name, sel in selections:
        for factor in (2.0, 0.0):
            scales = {k: torch.where(sel[k], torch.tensor(factor), torch.tensor(1.0)) for k in KINDS}
            with scaled(model, scales):
                change = {n: logit_differences(model, ex, pad, 64).mean().item() - base[n]
                          for n, ex in sets.items()}
            print(f"  {name:8s} x{factor:.0f}: train {change['train']:+.3f}  held-out {change['held']:+.3f}")

    for p in model.parameters():
        p.requires_grad_(False)
    space = component_space(model, config.model.architecture)

    def gradient(sel: dict, ex: list[Example], kinds: list[str]) -> torch.Tensor:
        deltas = RowDeltas(model, selected_rows(model, space, sel, kinds))
        with deltas.attached():
            for batch in micro_batches(ex, 64):
                (logit_difference(full_logits(model, batch, pad), batch).sum() / len(ex)).backward()
        return torch.cat([d.grad.flatten() for d in deltas.deltas])

    print("\nupdate direction (gradient of the mean logit difference w.r.t. the selected rows)")
    for name, sel in selections:
        for kinds in (list(KINDS), *([k] for k in KINDS)):
            if not any(sel[k].any() for k in kinds):
                continue
            g_train, g_held = gradient(sel, examples(step_set), kinds), gradient(sel, sets["held"], kinds)
            cos = torch.nn.functional.cosine_similarity(g_train, g_held, dim=0).item()
            print(f"  {name:8s} {'+'.join(kinds):10s} |g_train| {g_train.norm():.3f}  "
                  f"|g_held| {g_held.norm():.3f}  cosine {cos:+.3f}")


if __name__ == "__main__":
    main()
