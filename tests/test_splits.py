"""Per-template splits and the template filter."""

from __future__ import annotations

from collections import Counter

import pytest

from cca_ray.data.gsm_symbolic import DataError, Problem
from cca_ray.data.splits import split_counts, split_problems
from cca_ray.data.template_filter import select_templates, template_accuracies


def problems(n_templates: int = 5, per_template: int = 50) -> list[Problem]:
    return [Problem(id=t, instance=i, question=f"q{t}-{i}", answer=f"#### {i}")
            for t in range(n_templates) for i in range(per_template)]


def test_default_split_is_26_4_20_per_template_covering_every_template():
    splits = split_problems(problems(), seed=0)
    for part, count in zip((splits.train, splits.val, splits.test), (26, 4, 20), strict=True):
        assert Counter(p.id for p in part) == {t: count for t in range(5)}
    keys = [p.key for _, part in splits.items() for p in part]
    assert len(keys) == len(set(keys)) == 250


def test_split_is_deterministic_for_a_seed_and_ignores_input_order():
    data = problems()
    a = split_problems(data, seed=3)
    b = split_problems(list(reversed(data)), seed=3)
    c = split_problems(data, seed=4)
    assert a == b
    assert a.test != c.test


def test_split_ratios_are_configurable_and_checked():
    assert split_counts(50, (0.5, 0.1, 0.4)) == (25, 5, 20)
    splits = split_problems(problems(2, 10), (0.5, 0.2, 0.3), seed=0)
    assert Counter(p.id for p in splits.val) == {0: 2, 1: 2}
    with pytest.raises(DataError, match="summing to 1"):
        split_problems(problems(), (0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="template 0 has 2 instances"):
        split_problems(problems(1, 2))


def test_template_filter_uses_train_and_val_only():
    splits = split_problems(problems(3, 50), seed=0)
    correct = {}
    for p in splits.train + splits.val:
        # template 0: all right; template 1: 60% right; template 2: 70% right (below 0.8)
        correct[p.key] = {0: True, 1: p.instance % 5 < 3, 2: p.instance % 10 < 7}[p.id]
    for p in splits.test:
        correct[p.key] = p.id != 0  # test results must not matter: template 0 all wrong here
    acc = template_accuracies(splits, correct)
    assert acc[0] == 1.0
    assert select_templates(acc, 0.8) == [1, 2]
    assert select_templates(acc, 0.5) == []
    assert splits.keep_templates({1, 2}).test and {p.id for p in
                                                   splits.keep_templates({1}).train} == {1}


def test_template_filter_requires_every_train_val_result():
    splits = split_problems(problems(1, 50), seed=0)
    with pytest.raises(DataError, match="no greedy result for 30 train/val problems"):
        template_accuracies(splits, {})
    with pytest.raises(DataError, match="threshold"):
        select_templates({0: 0.5}, 0)
