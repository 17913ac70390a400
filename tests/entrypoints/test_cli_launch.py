"""The CLI under real launchers: every rank exits 0 after a clean run; bad input is reported
once, by rank 0, with exit 2, before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
from launch import BIN, LAUNCH

from spmd_diffusion.executor import spmd_executor

pytestmark = [pytest.mark.launcher, pytest.mark.slow]


def run(launcher: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*LAUNCH[launcher], *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "launcher, executor", [("mpiexec", "MPIExecutor"), ("torchrun", "TorchDistributedExecutor")]
)
def test_info_runs_on_every_rank(launcher, executor):
    done = run(launcher, "info", "--model", "tiny-dit")
    assert done.returncode == 0, done.stderr[-3000:]
    layout = json.loads(done.stdout[done.stdout.index("{") :])
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


def fake_srun(
    tmp_path, *args: str, tasks: int = 2, pmi: bool = False
) -> list[subprocess.CompletedProcess]:
    """Start ``tasks`` processes the way srun does: Slurm's step variables, no MPI launcher
    (``pmi``: plus the variables srun --mpi=pmi2 sets, without a PMI server behind them)."""
    processes = []
    for rank in range(tasks):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "777",
            "SLURM_STEP_ID": "0",
            **(
                {"PMI_RANK": str(rank), "PMI_SIZE": str(tasks), "PMI_JOBID": "777.0"} if pmi else {}
            ),
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": str(tasks),
            "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_NODEID": "0",
            "SLURM_STEP_TASKS_PER_NODE": str(tasks),
            "SLURM_STEP_NODELIST": "localhost",
        }
        processes.append(
            subprocess.Popen(
                [str(BIN / "omni-diffuse"), *args],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def test_srun_with_an_mpi_that_misses_its_pmi_is_diagnosed(tmp_path):
    rank0, rank1 = fake_srun(tmp_path, "info", "--model", "tiny-dit", "--executor", "mpi")
    assert rank0.returncode == 1 and rank1.returncode == 1
    assert (
        "says 2 ranks, but MPI sees a world of 1" in rank0.stderr and "--mpi=pmi2" in rank0.stderr
    )
    assert "MPI sees" not in rank1.stderr  # one message, from rank 0


def test_srun_with_pmi2_and_executor_torchrun_runs_over_torch_distributed(tmp_path):
    """srun --mpi=pmi2 sets PMI_RANK: still an srun launch, so --executor torchrun works."""
    rank0, rank1 = fake_srun(
        tmp_path, "info", "--model", "tiny-dit", "--executor", "torchrun", pmi=True
    )
    assert rank0.returncode == 0 and rank1.returncode == 0, (
        rank0.stderr[-2000:] + rank1.stderr[-2000:]
    )
    layout = json.loads(rank0.stdout[rank0.stdout.index("{") :])
    assert layout["launcher"] == "slurm" and layout["world_size"] == 2
    assert layout["executor"] == "TorchDistributedExecutor"


def test_only_rank_0_builds_the_engine_every_other_rank_serves(monkeypatch):
    served = []
    monkeypatch.setattr(
        spmd_executor, "serve_spmd_rank", lambda control: served.append(control) or 7
    )
    assert spmd_executor.serve_unless_rank0(None) is None
    assert spmd_executor.serve_unless_rank0(SimpleNamespace(rank=0)) is None
    rank1 = SimpleNamespace(rank=1)
    assert spmd_executor.serve_unless_rank0(rank1) == 7 and served == [rank1]
