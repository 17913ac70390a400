"""The jobs/ scripts as shipped, on a real one-node Slurm (Debian's slurm-wlm), on a CPU
partition: each is submitted with sbatch's own resource options (no editing), requeued
with ``scontrol requeue`` while it runs, and its rerun must resume from the manifest and
complete. Needs root and Slurm installed (``scripts/setup_slurm.sh``); skipped otherwise.

    python -m pytest -m slurm tests/cluster/test_slurm_jobs.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, unavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
PROMPTS = 16
ARGS = "--steps 2 --height 32 --width 32 --batch-size 1"

SCRIPTS = {  # script: (sbatch's overrides for a 2-CPU partition, extra environment)
    "srun_per_gpu.sbatch": (
        ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1"],
        {},
    ),
    "mpirun_in_allocation.sbatch": (
        ["--nodes=1", "--ntasks=2", "--gpus-per-node=0", "--cpus-per-task=1"],
        {},
    ),
    "torchrun_per_node.sbatch": (
        ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"],
        {"NPROC_PER_NODE": "2"},
    ),
}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(f"no one-node Slurm here: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - say what the daemons said
        cluster.stop()
        pytest.fail(f"Slurm did not start: {exc}")
    yield cluster
    cluster.stop()


def manifest_lines(output: Path) -> list[dict]:
    path = output / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(condition, timeout: float, what: str, cluster: SlurmCluster, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
            pytest.fail(f"{what} within {timeout:g} s\n--- job log\n{text}\n{cluster.logs()}")
        time.sleep(0.2)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_runs_is_requeued_and_resumes(slurm, script, tmp_path):
    options, extra_env = SCRIPTS[script]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a small picture number {i}\n" for i in range(PROMPTS)))
    output, log = tmp_path / "out", tmp_path / "job.log"
    env = {
        "PROMPTS": str(prompts),
        "OUTPUT": str(output),
        "EXTRA_ARGS": ARGS,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **extra_env,
    }
    env.pop("VENV", None)
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--time=00:10:00",
        f"--output={log}",
        *options,
        str(REPO / "jobs" / script),
        env={**env, "VENV": ""},
        cwd=REPO,
    )
    job = submitted.stdout.strip().split(";")[0]

    wait_for(lambda: len(manifest_lines(output)) >= 1, 120, "no image was made", slurm, log)
    slurm.requeue(job)
    wait_for(
        lambda: slurm.job_state(job) == "COMPLETED" and slurm.job_field(job, "Restarts") != "0",
        180,
        f"the requeued job did not complete (state {slurm.job_state(job)})",
        slurm,
        log,
    )

    run = json.loads((output / "run.json").read_text())
    text = log.read_text(errors="replace")
    assert run["status"] == "complete", text[-3000:]
    assert run["totals"]["images_ok"] + run["totals"]["images_skipped_as_done"] == PROMPTS
    assert (
        run["totals"]["images_skipped_as_done"] >= 1
    )  # it resumed: the first run's images were kept
    assert run["attempt"] == 2 and run["previous_run"]["status"] in (
        "interrupted",
        "killed",
        "failed",
    )
    assert run["layout"]["world_size"] == 2
    ids = [line["id"] for line in manifest_lines(output) if line["status"] == "ok"]
    assert len(set(ids)) == PROMPTS
    assert (
        text.count("(restart 0)") == 1 and text.count("(restart 1)") == 1
    )  # the log was appended to
