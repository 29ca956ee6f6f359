"""Shared pytest fixtures. Keep each fixture small and documented; heavy artifacts are cached under <repo>/.cache."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Gitignored; survives between test sessions so expensive artifacts are built once per checkout.
TEST_CACHE = REPO / ".cache"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) as an HF bf16 checkpoint; ~25 s the first time."""
    from nim_build.default_model import materialize_default_model
    from nim_build.errors import UserError

    try:
        return materialize_default_model(TEST_CACHE / "test-models")
    except UserError as e:
        pytest.skip(str(e))
