"""Deterministic CPU training: the pinned environment reaches a spawned child, two trainings there
are bit-identical, and a child's failure surfaces in the parent with its message."""

from __future__ import annotations

import os

import pytest
import torch

from cca_ray.tiny.determinism import DETERMINISTIC_ENV, deterministic_env, run_deterministic


def _child_settings() -> dict:
    """What the child sees: ATen's ISA, threads, deterministic mode and the pinned variables."""
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ.get(k) for k in deterministic_env(1)},
    }


def _train_small(seed: int) -> dict[str, torch.Tensor]:
    """A few training steps of a small tiny Llama; returns its final weights."""
    from cca_ray.tiny.model import TinySpec, make_model, train
    from cca_ray.tiny.tokenizer import train_tokenizer

    texts = [(f"what is {a} plus {b} ?", f" {a + b}") for a in range(20) for b in range(20)]
    tokenizer = train_tokenizer(p + a for p, a in texts)
    spec = TinySpec(hidden_size=64, intermediate_size=128, layers=2, heads=2, kv_heads=1,
                    head_dim=32, steps=8, batch_size=16, warmup=2)
    model = make_model(spec, tokenizer, seed)
    train(model, tokenizer, texts, spec, seed, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_environment_takes_effect_in_the_child_only():
    before = {k: os.environ.get(k) for k in DETERMINISTIC_ENV}
    seen = run_deterministic(_child_settings, threads=1)
    assert seen["capability"] == "AVX2"
    assert seen["threads"] == 1 and seen["deterministic"]
    assert seen["env"] == deterministic_env(1)
    assert {k: os.environ.get(k) for k in DETERMINISTIC_ENV} == before  # parent left as it was


def test_two_runs_give_bit_identical_weights():
    first = run_deterministic(_train_small, 0, threads=1)
    second = run_deterministic(_train_small, 0, threads=1)
    assert first.keys() == second.keys() and len(first) > 10
    assert all(torch.equal(first[k], second[k]) for k in first)
    other_seed = run_deterministic(_train_small, 1, threads=1)  # the comparison can fail
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


def test_child_error_surfaces_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"ValueError: invalid literal for int\(\) with base 10: 'x7'"):
        run_deterministic(int, "x7", threads=1)


def test_child_that_dies_is_reported_with_its_exit_code():
    with pytest.raises(RuntimeError, match="died without a result \\(exit code 3\\)"):
        run_deterministic(os._exit, 3, threads=1)
