"""A rank SIGKILLed mid-run under torchrun: rank 0 ends the job with exit 1 and one line that
names the lost rank (or, when torchrun's SIGTERM reaches it first, the interrupt line), with
no gloo tracebacks and no C++ abort at exit; no item is blamed for it, and a rerun resumes."""

# ruff: noqa: PLC0415 - optional extras load only where used (click)

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from gates import JobGate
from launch import LAUNCH

from spmd_diffusion.entrypoints.cli import cli

pytestmark = [pytest.mark.launcher, pytest.mark.slow]
TORCHRUN = LAUNCH["torchrun"]
ENDINGS = ("lost the connection to rank 1", "interrupted: the job received SIGTERM")


@pytest.mark.parametrize("layout", [[], ["--tp", "2"]], ids=["dp2", "tp2"])
def test_a_killed_rank_ends_the_job_in_one_line(tmp_path, layout):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
    output = tmp_path / "out"
    args = [
        *TORCHRUN,
        "generate",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--batch-size",
        "1",
        *layout,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gate = JobGate(tmp_path / "gate", after=2)
    job = subprocess.Popen(
        args,
        env=gate.env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        gate.wait_held(job)
        os.kill(gate.pid_of(1), signal.SIGKILL)
        gate.release()
        _, stderr = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 1, stderr[-3000:]
    ours = [
        line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:", "[rank"))
    ]
    assert any(ending in line for line in ours for ending in ENDINGS), stderr[-3000:]
    assert "pair.cc" not in stderr and "GLHF" not in stderr, "gloo's own text reached the user"
    assert "terminate called" not in stderr, "rank 0 aborted in C++ at exit"
    assert stderr.count("Traceback (most recent call last)") <= 1, stderr[
        -3000:
    ]  # torchrun's own report
    run = json.loads((output / "run.json").read_text())
    assert run["status"] in ("failed", "interrupted") and run["totals"]["items_failed"] == 0
    if layout:  # the rerun resumes and completes
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr[-3000:]
        totals = json.loads((output / "run.json").read_text())["totals"]
        assert totals["images_ok"] + totals["images_skipped_as_done"] == 8


def test_generate_help_lists_every_exit_code_with_the_launchers_own():
    from click.testing import CliRunner

    text = " ".join(CliRunner().invoke(cli, ["generate", "--help"]).output.split())
    for code in (
        "0 all images made",
        "3 some items failed",
        "2 bad input",
        "1 a fatal fault",
        "130 interrupted",
        "143 terminated",
        "9: SIGKILL",
        "gives 137",
    ):
        assert code in text, code
