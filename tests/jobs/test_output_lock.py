"""One job per output directory: a second job is refused at once naming the first; the lock
of a job that died is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from gates import JobGate
from launch import BIN

from spmd_diffusion.jobs.lock import lock_output

pytestmark = [pytest.mark.launcher, pytest.mark.slow]


def test_a_second_job_is_refused_naming_the_first_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    output = tmp_path / "out"
    args = [
        str(BIN / "omni-diffuse"),
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
        "--executor",
        "uni",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gate = JobGate(tmp_path / "gate", after=1)  # the first job holds the directory, mid-run
    first = subprocess.Popen(
        args,
        env=gate.env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        gate.wait_held(first)
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        holder = json.loads((output / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        assert (
            second.stderr.count(
                f"is in use by another job (host {holder['host']}, pid {first.pid}, started "
                f"{holder['started']})"
            )
            == 1
        ), second.stderr
        assert "loaded" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock
        first.wait()
    third = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert third.returncode == 0, third.stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "complete" and run["totals"]["images_skipped_as_done"] == 1


def test_the_lock_is_per_directory_and_released_by_close(tmp_path):
    held = lock_output(tmp_path / "a")
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pathlib import Path; import sys; "
            "from spmd_diffusion.jobs.lock import lock_output; lock_output(Path(sys.argv[1]))",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0 and "is in use by another job" in other.stderr
    lock_output(tmp_path / "b").close()  # another directory: free
    held.close()
    again = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pathlib import Path; import sys; "
            "from spmd_diffusion.jobs.lock import lock_output; lock_output(Path(sys.argv[1]))",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
