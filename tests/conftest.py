"""Shared fixtures: one tiny-model cache per test session (inherited by spawned ranks)."""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Built once per session; subprocesses and spawned workers inherit the variable.
    if not os.environ.get("SPMD_DIFFUSION_CACHE"):
        os.environ["SPMD_DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="spmd-diffusion-test-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_unet() -> str:
    from spmd_diffusion.models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-unet"))


@pytest.fixture(scope="session")
def tiny_dit() -> str:
    from spmd_diffusion.models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-dit"))

