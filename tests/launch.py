"""Running the tool's jobs from tests: the venv's binaries, one command per launcher, and
readers of a job's outputs. Shared by every test that starts a real job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spmd_diffusion.entrypoints.cli import main

BIN = Path(sys.executable).parent  # omni-diffuse, mpiexec and torchrun of the test's venv
TESTS = Path(__file__).resolve().parent
LAUNCH = {
    "none": [str(BIN / "omni-diffuse")],
    "mpiexec": [str(BIN / "mpiexec"), "-n", "2", str(BIN / "omni-diffuse")],
    "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", "2", "-m", "spmd_diffusion"],
}
COMMON = ["--steps", "4", "--height", "64", "--width", "64"]


def generate(
    launcher: str, *args: str, timeout: float = 180, **popen
) -> subprocess.CompletedProcess:
    """``omni-diffuse generate ARGS`` under ``launcher`` (none, mpiexec or torchrun: 2 ranks),
    one torch thread per rank, its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*LAUNCH[launcher], "generate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **popen,
    )


def generate_here(*args: str) -> int:
    """The no-launcher job inside this test process (uni executor: the worker runs here), for
    references: the same code path as a ``none`` run less a process start and model load."""
    try:
        main(["generate", *args, "--executor", "uni"])
    except SystemExit as exited:
        return exited.code
    return 0


def manifest(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]


def images(output: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((output / "images").glob("*.png"))}
