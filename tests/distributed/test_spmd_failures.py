"""A failure on one rank ends the whole job, non-zero and fast, under mpiexec and torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import BIN

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

JOB = str(Path(__file__).parents[1] / "multirank" / "failure_job.py")
LAUNCHERS = {
    "mpiexec": [str(BIN / "mpiexec"), "-n", "2", sys.executable, JOB],
    "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", JOB],
}


def run_job(launcher: str, mode: str, limit: float = 300) -> tuple[int, str]:
    """A job that hangs stalls for an hour: the limit (start-up included, any machine) fails it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*LAUNCHERS[launcher], mode], capture_output=True, text=True, timeout=limit, env=env
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize(
    "mode, expected",
    [
        ("kill", None),
        ("fatal", "rank 1 gives up"),
        ("timeout", "did not finish within 2 s on rank(s) 1"),
        ("rank0-error", "rank 0 found a bug"),
    ],
)
def test_failure_ends_the_job(launcher, mode, expected):
    code, output = run_job(launcher, mode)
    assert "ready" in output, output[-3000:]
    assert code != 0, output[-3000:]
    if expected:
        assert expected in output, output[-3000:]
    if mode == "fatal":
        assert "[rank 1]" in output and "fatal error" in output
