"""Ctrl-C (SIGINT) and SIGTERM (Slurm's time limit, scancel, requeue): one line saying the
job was interrupted, run.json says so, exit 130 / 143, no traceback from any rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from gates import JobGate
from launch import LAUNCH as COMMANDS

from spmd_diffusion.entrypoints.cli import interrupt_message
from spmd_diffusion.errors import Terminated

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

LAUNCH = {  # (the command before "generate", options after it)
    "mpiexec": (COMMANDS["mpiexec"], []),
    "none": (COMMANDS["none"], ["--num-gpus", "2"]),
}
ARGS = ["--steps", "4", "--height", "64", "--width", "64", "--batch-size", "2"]


# Ctrl-C where it is typed (a job started without a launcher, mp workers), SIGTERM where
# Slurm sends it (an MPI job): one job each, the launcher x signal product added nothing but
# two more job start-ups (the handler is one for both signals).
@pytest.mark.parametrize(
    "launcher, sent, code, why",
    [
        ("none", signal.SIGINT, 130, "was stopped (Ctrl-C)"),
        ("mpiexec", signal.SIGTERM, 143, "received SIGTERM"),
    ],
    ids=["SIGINT-none", "SIGTERM-mpiexec"],
)
def test_a_signal_ends_the_job_with_one_line(tmp_path, launcher, sent, code, why):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(40)))
    output = tmp_path / "out"
    command, extra = LAUNCH[launcher]
    gate = JobGate(
        tmp_path / "gate", after=1
    )  # the engine holds after one batch: the signal lands mid-run
    job = subprocess.Popen(
        [*command, "generate", "--prompts", str(prompts), "--output", str(output), *ARGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=gate.env({**os.environ, "OMP_NUM_THREADS": "1"}),
    )
    try:
        gate.wait_held(job)
        os.killpg(job.pid, sent)  # what the terminal (Ctrl-C) or Slurm (SIGTERM) does
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == code, stderr[-3000:]
    assert stderr.count(f"interrupted: the job {why}") == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "leaked semaphore" not in stderr and "did not stop in time" not in stderr, stderr[-3000:]
    assert json.loads((output / "run.json").read_text())["status"] == "interrupted"


def test_only_a_batch_job_is_told_to_resume():

    assert (
        interrupt_message(["generate", "--prompt", "x"], KeyboardInterrupt())
        == "interrupted: the job was stopped (Ctrl-C); run the same command again to resume"
    )
    assert (
        interrupt_message(["-v", "serve", "--port", "1"], Terminated())
        == "stopped: the server received SIGTERM"
    )
    assert interrupt_message(["worker"], Terminated()) == "stopped: the worker received SIGTERM"
    assert "resume" not in interrupt_message(["info"], KeyboardInterrupt())
