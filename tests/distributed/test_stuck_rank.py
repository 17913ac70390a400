"""A stopped rank (SIGSTOP: alive, silent) ends the job within its batch deadline, naming the
rank, under every launcher; run.json says failed and a rerun resumes as after a kill.

The same launch checks, while the job is held mid-run, that a one-node job's ranks listen on
loopback only (MPI's UCX/libfabric layers, gloo): the sockets the launcher itself opens
(mpiexec's control port, torchrun's agent store) are the launcher's, listed in the README."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from gates import JobGate
from launch import LAUNCH as COMMANDS
from sockets import is_loopback, own_listening_sockets

pytestmark = [pytest.mark.launcher, pytest.mark.slow]
# Enough batches that work is left for the stopped rank after the gate opens: a replica frees
# itself once its batch is denoised, before that batch's records count as delivered, so a fast
# rank 0 may run several batches before the gate sees both ranks deliver one.
PROMPTS = 32
LAUNCH = {  # (the command before "generate", options after it)
    "none": (COMMANDS["none"], ["--num-gpus", "2"]),
    "mpiexec": (COMMANDS["mpiexec"], []),
    "torchrun": (COMMANDS["torchrun"], []),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCH))
def test_a_stopped_rank_ends_the_job_naming_it(tmp_path, launcher):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(PROMPTS)))
    output = tmp_path / "out"
    command, extra = LAUNCH[launcher]
    args = [
        *command,
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
        "--batch-timeout",
        "5",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gate = JobGate(
        tmp_path / "gate", after=2, ranks=2
    )  # both replicas made a batch: their next ones are timed
    job = subprocess.Popen(
        args,
        env=gate.env(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stopped = None
    try:
        gate.wait_held(job)
        ranks = {gate.pid_of(0), gate.pid_of(1)}
        listening = own_listening_sockets(ranks)
        assert all(is_loopback(address) for address, _port in listening), listening
        if (
            launcher != "none"
        ):  # gloo's pairs (and MPI's UCX listeners): there is something to check
            assert listening, "no listening socket of the ranks found"
        stopped = gate.pid_of(1)
        os.kill(stopped, signal.SIGSTOP)
        gate.release()
        _, stderr = job.communicate(timeout=180)
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 1, stderr[-3000:]
    assert "did not finish within 5 s on rank(s) 1" in stderr, stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "failed" and "rank(s) 1" in run["error"]
    if launcher == "mpiexec":  # the rerun resumes and completes, as after a kill
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr[-3000:]
        totals = json.loads((output / "run.json").read_text())["totals"]
        assert (
            totals["images_skipped_as_done"] >= 2
            and totals["images_ok"] + totals["images_skipped_as_done"] == PROMPTS
        )
