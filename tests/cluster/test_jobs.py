"""The Slurm scripts in jobs/: valid bash, strict mode, requeue, and one run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.sbatch"))


def test_there_is_a_script_per_launch_style():
    assert {path.name for path in JOBS} == {
        "srun_per_gpu.sbatch",
        "torchrun_per_node.sbatch",
        "mpirun_in_allocation.sbatch",
    }


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_script_is_valid_strict_and_requeues(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "set -euo pipefail" in text
    assert (
        "#SBATCH --requeue" in text and "scontrol requeue" in text and "trap requeue USR1" in text
    )
    assert "omni-diffuse generate" in text or "spmd_diffusion generate" in text
    assert "#SBATCH --open-mode=append" in text  # a requeued rerun must not truncate the log
    assert (
        "${VIRTUAL_ENV:-${SLURM_SUBMIT_DIR:-.}/.venv}" in text
    )  # the active venv, else scripts/setup.sh's


def test_scripts_follow_the_allocation():
    texts = {path.name: path.read_text() for path in JOBS}
    assert (
        "--gpus-per-task" not in texts["mpirun_in_allocation.sbatch"]
    )  # hydra's helper is one task per node
    assert "GPUS_PER_NODE=" not in texts["torchrun_per_node.sbatch"]
    assert (
        "SLURM_GPUS_ON_NODE" in texts["torchrun_per_node.sbatch"]
        and ":29500" not in texts["torchrun_per_node.sbatch"]
    )
    srun = texts["srun_per_gpu.sbatch"]
    assert 'SRUN_MPI="${SRUN_MPI-pmi2}"' in srun and "pmix}" not in srun
    assert "spmd_diffusion.distributed.mpich_shm" in srun and "SLURM_RESTART_COUNT" in srun


@pytest.mark.slow
@pytest.mark.launcher
def test_mpirun_script_runs_inside_a_fake_allocation(tmp_path):
    """Run the mpirun script as sbatch would, with Slurm's variables set: it must see MPI."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\na bicycle\na forest\n")
    env = {
        **os.environ,
        "VENV": str(Path(sys.executable).parent.parent),
        "PROMPTS": str(prompts),
        "OUTPUT": str(tmp_path / "out"),
        "MODEL": "tiny-dit",
        "EXTRA_ARGS": "--steps 2 --height 64 --width 64",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "0",
        "SLURM_JOB_NAME": "test",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        ["bash", str(JOBS[0].parent / "mpirun_in_allocation.sbatch")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["layout"]["launcher"] == "mpi" and run["layout"]["world_size"] == 2
    assert run["totals"]["images_ok"] == 3


@pytest.mark.slow
@pytest.mark.launcher
def test_demo_script_runs_the_main_job(tmp_path):
    """README's first command: set-up (already done here, so quick) and mpirun -n 2 generate."""
    demo = Path(__file__).parents[2] / "scripts" / "demo.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(demo), "--output", str(tmp_path / "demo"), "--steps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert run["layout"]["launcher"] == "mpi" and run["layout"]["world_size"] == 2
    assert run["totals"]["images_ok"] == 8 and (tmp_path / "demo" / "contact_sheet.png").exists()
