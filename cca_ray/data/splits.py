"""Per-template splits: each template's instances are shuffled with a seed and cut 26/4/20
(ratios configurable), so every split covers every template. Deterministic for a seed."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from cca_ray.data.gsm_symbolic import DataError, Problem, write_problems

DEFAULT_RATIOS = (0.52, 0.08, 0.40)


@dataclass(frozen=True)
class Splits:
    train: list[Problem]
    val: list[Problem]
    test: list[Problem]

    def items(self) -> list[tuple[str, list[Problem]]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]

    def keep_templates(self, template_ids: set) -> Splits:
        """The same splits restricted to some templates (the template filter's output)."""
        return Splits(*[[p for p in part if p.id in template_ids] for _, part in self.items()])


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """How many of n instances go to train/val/test (50 -> 26/4/20 for the default ratios)."""
    n_train = round(n * ratios[0])
    n_val = round(n * ratios[1])
    return n_train, n_val, n - n_train - n_val


def split_problems(problems: list[Problem], ratios: tuple[float, float, float] = DEFAULT_RATIOS,
                   seed: int = 0) -> Splits:
    """Split per template; raises DataError if a template is too small for every split."""
    if len(ratios) != 3 or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios must be 3 positive numbers summing to 1, got {ratios}")
    by_template: dict = defaultdict(list)
    for p in problems:
        by_template[p.id].append(p)
    parts: tuple[list, list, list] = ([], [], [])
    for template_id in sorted(by_template, key=str):
        group = sorted(by_template[template_id], key=lambda p: p.instance)
        counts = split_counts(len(group), ratios)
        if min(counts) < 1:
            raise DataError(
                f"template {template_id} has {len(group)} instances: ratios {ratios} give "
                f"{counts}, leaving a split empty; use more instances per template"
            )
        random.Random(f"{seed}/{template_id}").shuffle(group)
        start = 0
        for part, count in zip(parts, counts, strict=True):
            part.extend(group[start : start + count])
            start += count
    return Splits(*parts)


def write_splits(splits: Splits, out_dir: str | Path) -> dict[str, Path]:
    """train.jsonl, val.jsonl and test.jsonl in out_dir."""
    return {name: write_problems(part, Path(out_dir) / f"{name}.jsonl")
            for name, part in splits.items()}
