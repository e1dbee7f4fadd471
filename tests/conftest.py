"""Shared fixtures. Tests that read ../shared skip cleanly when it is absent (a user's clone)."""

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
