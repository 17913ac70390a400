"""Shared fixtures: one tiny-model cache per test session (inherited by spawned ranks)."""

from __future__ import annotations

import os
import tempfile

import pytest

from spmd_diffusion.models import ensure_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    # Built once per session; subprocesses and spawned workers inherit the variable.
    if not os.environ.get("SPMD_DIFFUSION_CACHE"):
        os.environ["SPMD_DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="spmd-diffusion-test-cache-")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray reads its authentication mode when it is imported: the test cluster (ray_address)
    # and everything that joins it use token authentication.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Under pytest-xdist, each worker's torchrun jobs get their own rendezvous port
    # (torchrun reads --master-port from PET_MASTER_PORT), so two jobs never meet.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        os.environ.setdefault("PET_MASTER_PORT", str(29500 + 10 * (1 + int(worker[2:]))))


@pytest.fixture(scope="session")
def tiny_unet() -> str:

    return str(ensure_tiny_model("tiny-unet"))


@pytest.fixture(scope="session")
def tiny_dit() -> str:

    return str(ensure_tiny_model("tiny-dit"))


@pytest.fixture(scope="session")
def tiny_video() -> str:

    return str(ensure_tiny_model("tiny-video"))


@pytest.fixture(scope="session")
def ray_address():
    """A one-node Ray cluster for the session, started in this process (token
    authentication; 4 logical CPUs, so 4 actors fit on 2 cores) and exported as
    $RAY_ADDRESS, so in-process executors and ``omni-diffuse`` subprocesses join it.
    ``ray.shutdown`` stops it and nothing else (``ray stop`` would end every Ray cluster on
    the machine, a user's too)."""
    ray = pytest.importorskip(
        "ray", reason="the ray executor's tests need Ray: pip install '.[ray]'"
    )
    ray.init(
        address="local", num_cpus=4, num_gpus=0, include_dashboard=False, configure_logging=False
    )
    address = ray.get_runtime_context().gcs_address
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
