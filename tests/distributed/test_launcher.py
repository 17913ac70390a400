"""Launcher detection from the environment alone (no MPI is imported)."""

from __future__ import annotations

import sys

import pytest

import spmd_diffusion.entrypoints.cli  # noqa: F401 - the CLI module must not import it either
import spmd_diffusion.executor  # noqa: F401
from spmd_diffusion.distributed.control.base import default_backend
from spmd_diffusion.distributed.launcher import (
    MPI,
    NONE,
    SLURM,
    TORCHRUN,
    detect_launcher,
    first_slurm_host,
)

SBATCH = {  # what an sbatch script itself sees: a job, but no srun step
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "gpu[001-002]",
}


def test_no_launcher():
    assert detect_launcher({}).kind == NONE
    assert detect_launcher(SBATCH).kind == NONE  # the batch step is not a launch


def test_torchrun():
    env = {
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
    }
    info = detect_launcher(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        TORCHRUN,
        3,
        8,
        1,
        4,
    )
    assert not info.is_root and info.is_distributed


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": "2",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            },
            (2, 4, 0, 2),
        ),
        (
            {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
            (1, 2, 1, 2),
        ),
        ({"PMIX_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6"}, (5, 6, None, None)),
        (
            {
                "MV2_COMM_WORLD_RANK": "7",
                "MV2_COMM_WORLD_SIZE": "8",
                "MV2_COMM_WORLD_LOCAL_RANK": "3",
            },
            (7, 8, 3, None),
        ),
    ],
)
def test_mpi_families(env, expected):
    info = detect_launcher(env)
    assert info.kind == MPI
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == expected


def test_mpirun_inside_sbatch_is_mpi_not_srun():
    # Open MPI starts its daemons with srun: the ranks inherit a step id and SLURM_PROCID.
    env = {
        **SBATCH,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
    }
    info = detect_launcher(env)
    assert (info.kind, info.rank, info.world_size) == (MPI, 5, 8)


def test_srun_step():
    env = {
        **SBATCH,
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    info = detect_launcher(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        SLURM,
        5,
        8,
        1,
        4,
    )
    uneven = {**env, "SLURM_STEP_TASKS_PER_NODE": "3,2(x2)", "SLURM_NODEID": "2"}
    assert detect_launcher(uneven).local_world_size == 2


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("node7", "node7"),
        ("a-b[10,12]", "a-b10"),
        ("n[1-2],m[3]", "n1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_detection_does_not_import_mpi():
    detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"})

    assert "mpi4py.MPI" not in sys.modules


SRUN_STEP = {
    **SBATCH,
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "2",
}


@pytest.mark.parametrize(
    "pmi",
    [
        {},
        {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "5", "PMI_JOBID": "4242.0"},  # srun --mpi=pmi2
        {"PMIX_RANK": "1", "PMIX_NAMESPACE": "slurm.pmix.4242.0"},
    ],  # srun --mpi=pmix: no PMIX_SIZE
    ids=["none", "pmi2", "pmix"],
)
def test_srun_is_srun_whatever_its_pmi_plugin(pmi):
    info = detect_launcher({**SRUN_STEP, **pmi})
    assert (info.kind, info.rank, info.world_size, info.local_rank, info.local_world_size) == (
        SLURM,
        1,
        2,
        1,
        2,
    )


def test_hydra_inside_an_allocation_is_mpi():
    # MPICH's mpiexec starts one proxy per node with `srun -N 1 -n 1`: its ranks see that
    # step (procid 0 of 1) and hydra's own variables.
    env = {
        **SBATCH,
        "SLURM_STEP_ID": "1",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "1",
        "PMI_RANK": "3",
        "PMI_SIZE": "4",
        "PMI_FD": "9",
        "MPI_LOCALRANKID": "3",
        "MPI_LOCALNRANKS": "4",
        "PMI_HOSTNAME": "node1",
    }
    info = detect_launcher(env)
    assert (info.kind, info.rank, info.world_size, info.local_rank) == (MPI, 3, 4, 3)


def test_pmix_without_size_takes_slurms_task_count():
    # a PMIx launch whose ranks disagree with the step (not srun's own): still never size 0
    env = {"PMIX_RANK": "3", "SLURM_NTASKS": "4"}
    assert detect_launcher(env).world_size == 4


@pytest.mark.parametrize(
    "pmi, backend",
    [({}, "torch"), ({"PMI_RANK": "1", "PMI_FD": "5"}, "mpi"), ({"PMIX_RANK": "1"}, "mpi")],
    ids=["srun --mpi=none", "pmi2", "pmix"],
)
def test_srun_uses_mpi_only_where_srun_gave_a_pmi(pmi, backend):

    env = {**SRUN_STEP, **pmi}
    assert default_backend(detect_launcher(env), env) == backend
