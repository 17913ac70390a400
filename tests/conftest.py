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
    from spmd_diffusion.models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-unet"))


@pytest.fixture(scope="session")
def tiny_dit() -> str:
    from spmd_diffusion.models import ensure_tiny_model

    return str(ensure_tiny_model("tiny-dit"))



@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """A one-node Ray cluster for the session (``ray start --head``, token authentication,
    4 logical CPUs so 4 actors fit on 2 cores), exported as $RAY_ADDRESS so in-process
    executors and ``omni-diffuse`` subprocesses join it. Stopped at the end."""
    pytest.importorskip("ray", reason="the ray executor's tests need Ray: pip install '.[ray]'")
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [ray_bin, "start", "--head", "--port", str(port), "--num-cpus", "4", "--num-gpus", "0",
         "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    host = next(line.split("--address='")[1].split("'")[0] for line in (started.stdout + started.stderr).splitlines()
                if "--address='" in line)
    saved = {"RAY_ADDRESS": os.environ.get("RAY_ADDRESS")}
    os.environ["RAY_ADDRESS"] = host
    try:
        yield host
    finally:
        import ray

        ray.shutdown()
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
