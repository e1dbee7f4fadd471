"""Shared fixtures. Tests that read ../shared skip cleanly when it is absent (a user's clone); the
small built-in model is built once per session for every test module that needs it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TEMPLATES = REPO.parent / "shared" / "data" / "gsm-symbolic" / "templates" / "symbolic"
BUILTIN_TEMPLATES = REPO / "cca_ray" / "tiny" / "templates"


@pytest.fixture(scope="session")
def shared_templates_dir() -> Path:
    if not SHARED_TEMPLATES.is_dir():
        pytest.skip(f"{SHARED_TEMPLATES} not present (only the project's workspace has ../shared)")
    return SHARED_TEMPLATES


@pytest.fixture(scope="session")
def builtin_templates_dir() -> Path:
    return BUILTIN_TEMPLATES


@pytest.fixture(scope="session")
def small_settings():
    """Build settings for a small built-in model that trains in seconds."""
    from cca_ray.tiny.build import BuildSettings
    from cca_ray.tiny.model import TinySpec

    return BuildSettings(
        spec=TinySpec(hidden_size=64, intermediate_size=128, layers=2, heads=2, kv_heads=1,
                      head_dim=32, steps=40, batch_size=16, warmup=5),
        instances_per_template=10, train_pool_per_template=20, world_countries=8,
        eval_max_new_tokens=24,
    )


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, small_settings) -> Path:
    """The small built-in model's HF folder (model, tokenizer, build report, lm-eval tasks)."""
    from cca_ray.tiny.build import build

    return build(tmp_path_factory.mktemp("tiny") / "model", small_settings, progress=False)
