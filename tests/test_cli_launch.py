"""The CLI under real launchers: every rank exits 0 after a clean run; bad input is reported
once, by rank 0, with exit 2, before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

BIN = Path(sys.executable).parent
LAUNCH = {
    "mpiexec": [str(BIN / "mpiexec"), "-n", "2", str(BIN / "omni-diffuse")],
    "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "spmd_diffusion"],
    "none": [str(BIN / "omni-diffuse")],
}


def run(launcher: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*LAUNCH[launcher], *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("launcher, executor", [("mpiexec", "MPIExecutor"), ("torchrun", "TorchDistributedExecutor")])
def test_info_runs_on_every_rank(launcher, executor):
    done = run(launcher, "info", "--model", "tiny-dit")
    assert done.returncode == 0, done.stderr[-3000:]
    layout = json.loads(done.stdout[done.stdout.index("{"):])
    assert layout["world_size"] == 2 and layout["executor"] == executor
    assert [r["rank"] for r in layout["ranks"]] == [0, 1]


def test_bad_input_is_reported_once_with_exit_2(tmp_path):
    done = run("mpiexec", "info", "--model", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.count("does not exist") == 1, done.stderr
    assert "loaded" not in done.stderr  # no rank loaded a model


def test_one_process_executor_is_refused_under_a_launcher():
    done = run("mpiexec", "info", "--executor", "uni", "--model", "tiny-dit")
    assert done.returncode == 2 and done.stderr.count("runs in one process") == 1
