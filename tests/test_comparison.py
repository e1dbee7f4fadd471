"""comparison.json's arithmetic: the gain's interval over templates and the table's checks."""

from __future__ import annotations

import pytest

from cca_ray.reports.compare import build_comparison, render_markdown, template_ci


def test_template_ci_is_a_t_interval_over_per_template_differences():
    base = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}
    method = {"a": 0.6, "b": 0.7, "c": 0.5, "d": 0.6}
    ci = template_ci(method, base)
    assert ci["gain"] == pytest.approx(0.1) and ci["templates"] == 4
    # diffs 0.1, 0.2, 0.0, 0.1: sd 0.0816..., t(0.975, 3) = 3.1824
    half = 3.182446305 * 0.0816496581 / 2
    assert ci["ci"] == pytest.approx([0.1 - half, 0.1 + half], abs=1e-6)
    same = template_ci(base, base)
    assert same["gain"] == 0 and same["ci"] == [0, 0]


def _method(test: float, trainable: int, general: float) -> dict:
    return {"test_accuracy": test, "per_template_test": {"a": test, "b": test}, "val_accuracy": test,
            "lr": 0.01, "best_step": 2, "components_fraction": 0.05, "trainable_parameters": trainable,
            "entries_changed": trainable, "general_deltas": {"t": {"delta": general, "stderr": 0.01}},
            "wall_seconds": 60.0, "tune_seconds": 50.0, "eval_seconds": 10.0, "trials": [{}, {}]}


def test_checks_compare_cca_with_random_and_the_parameter_ratios():
    base = {"test": {"accuracy": 0.4, "per_template": {"a": 0.4, "b": 0.4}}, "val_accuracy": 0.4,
            "general": {}, "parameters": 10_000, "test_problems": 20}
    methods = {"cca": _method(0.45, 10, 0.0), "lora": _method(0.44, 500, -0.01),
               "full_ft": _method(0.5, 10_000, -0.05), "random": _method(0.41, 10, 0.0)}
    r = build_comparison("m", base, methods, {"trials_per_method": 2})
    assert r["methods"]["cca"]["gain"] == pytest.approx(0.05)
    assert r["methods"]["cca"]["params_changed_fraction"] == pytest.approx(0.001)
    assert r["checks"] == {"cca_gain_above_random": True, "lora_over_cca_params_changed": pytest.approx(50),
                           "full_ft_over_cca_params_changed": pytest.approx(1000),
                           "random_gain_inside_cca_ci": False}
    md = render_markdown(r)
    assert "CCA - random = +4.00 points; the random control's gain lies outside" in md
    assert "LoRA trains 50x (at least 10x)" in md and "full fine-tuning trains 1,000x (at least 100x)" in md
    assert "| full fine-tuning | 50.00% | +10.00" in md
    r2 = build_comparison("m", base, methods | {"random": _method(0.46, 10, 0.0)}, {"trials_per_method": 2})
    assert r2["checks"]["cca_gain_above_random"] is False
    tie = build_comparison("m", base, methods | {"random": _method(0.45, 10, 0.0)}, {"trials_per_method": 2})
    assert tie["checks"]["random_gain_inside_cca_ci"] is True
    tie_md = render_markdown(tie)
    assert "**no** (CCA - random = +0.00 points; the random control's gain lies inside" in tie_md
