"""Template filter: train CCA on the templates the base model finds hard (greedy accuracy below
a threshold, 0.8 by default), measured on train+val instances only so the test split stays
untouched (the reference code also used test instances; we do not)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from cca_ray.data.answers import per_template_accuracy
from cca_ray.data.gsm_symbolic import DataError
from cca_ray.data.splits import Splits


def template_accuracies(splits: Splits, correct: Mapping[tuple, bool]) -> dict[Hashable, float]:
    """Per-template accuracy over train+val instances; ``correct`` maps (id, instance) -> bool.

    Results for test instances are ignored even when present.
    """
    seen = splits.train + splits.val
    missing = [p.key for p in seen if p.key not in correct]
    if missing:
        raise DataError(
            f"template filter: no greedy result for {len(missing)} train/val problems "
            f"(first: {missing[:3]}); score every train and val problem first"
        )
    return per_template_accuracy((p.id, correct[p.key]) for p in seen)


def select_templates(accuracies: Mapping[Hashable, float], threshold: float = 0.8,
                     minimum: float = 0.0) -> list:
    """Template ids with minimum <= accuracy < threshold, in sorted order (a template the model
    never solves gives CCA no right trace to contrast, so a real model's run may drop those)."""
    if not 0 < threshold <= 1:
        raise DataError(f"template threshold must be in (0, 1], got {threshold}")
    if not 0 <= minimum < threshold:
        raise DataError(f"template minimum accuracy must be in [0, {threshold}), got {minimum}")
    return sorted((t for t, acc in accuracies.items() if minimum <= acc < threshold), key=str)
