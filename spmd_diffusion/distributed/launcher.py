"""Which launcher started this process, read from the environment alone.

Order matters: torchrun first (it sets RANK/WORLD_SIZE explicitly), then MPI, then Slurm's
srun. ``mpirun`` inside an sbatch allocation inherits SLURM_* variables (and Open MPI and
MPICH's hydra start their per-node daemons with srun), so an MPI launcher's variables win
over Slurm's. But srun's own PMI plugins set ``PMI_RANK`` (pmi2) or ``PMIX_RANK`` (pmix)
too: a task whose only MPI variables are those, with the rank Slurm gave it, was started by
srun, and is recorded as such (MPI is then its transport when the library speaks that PMI;
see :mod:`spmd_diffusion.distributed.control.base`). Nothing here imports mpi4py: detection
is free, and MPI is initialised only when it will be used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from spmd_diffusion import envs

NONE, TORCHRUN, MPI, SLURM = "none", "torchrun", "mpi", "slurm"

# (rank, size, local rank, local size) variables of each MPI family, most specific first.
MPI_VARIABLES = (
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    (
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job. ``local_*`` may be None where the launcher does
    not say (MPI then asks the library, with a shared-memory split)."""

    kind: str
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = 0
    local_world_size: int | None = 1

    @property
    def is_distributed(self) -> bool:
        return self.kind != NONE

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        return None
    return int(value)


def _torchrun(env: Mapping[str, str]) -> LaunchInfo | None:
    rank, size, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
    if "TORCHELASTIC_RUN_ID" not in env and not (
        rank is not None and size is not None and local is not None
    ):
        return None
    if rank is None or size is None:
        return None
    return LaunchInfo(
        TORCHRUN, rank, size, local if local is not None else 0, _int(env, "LOCAL_WORLD_SIZE")
    )


# Set by an MPI launcher's own per-node daemon (hydra, Open MPI, MVAPICH), never by srun's
# PMI plugins: their presence means mpirun/mpiexec started this rank.
MPI_LAUNCHER_ONLY = (
    "OMPI_COMM_WORLD_RANK",
    "MV2_COMM_WORLD_RANK",
    "MPI_LOCALRANKID",
    "PMI_HOSTNAME",
)


def _mpi(env: Mapping[str, str]) -> LaunchInfo | None:
    for rank_var, size_var, local_var, local_size_var in MPI_VARIABLES:
        rank = _int(env, rank_var)
        if rank is None:
            continue
        size = _int(env, size_var)
        if size is None and rank_var == "PMIX_RANK":  # Slurm's pmix plugin sets no PMIX_SIZE
            size = _int(env, "OMPI_COMM_WORLD_SIZE") or _slurm_tasks(env)
        return LaunchInfo(
            MPI,
            rank,
            size if size is not None else 0,
            _int(env, local_var),
            _int(env, local_size_var),
        )
    return None


def _slurm_tasks(env: Mapping[str, str]) -> int | None:
    return _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")


def _started_by_srun_pmi(env: Mapping[str, str], slurm: LaunchInfo) -> bool:
    """srun --mpi=pmi2/pmix: PMI variables set by Slurm itself, agreeing with the step."""
    if any(name in env for name in MPI_LAUNCHER_ONLY):
        return False
    rank = _int(env, "PMI_RANK")
    if rank is None:
        rank = _int(env, "PMIX_RANK")
    return rank is None or rank == slurm.rank


def _slurm(env: Mapping[str, str]) -> LaunchInfo | None:
    # Only inside a job step started by srun: the batch script itself also has SLURM_PROCID.
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if step is None or step in ("batch", "extern", "4294967294", "4294967295"):
        return None
    rank = _int(env, "SLURM_PROCID")
    size = _slurm_tasks(env)
    if rank is None or size is None:
        return None
    local = _int(env, "SLURM_LOCALID")
    return LaunchInfo(SLURM, rank, size, local, _local_tasks(env))


def _local_tasks(env: Mapping[str, str]) -> int | None:
    """Tasks on this node, from SLURM_STEP_TASKS_PER_NODE (``2(x3),1``) and SLURM_NODEID."""
    spec, node = (
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"),
        _int(env, "SLURM_NODEID"),
    )
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node] if node < len(counts) else None


def detect_launcher(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """The launcher of this process: torchrun, MPI, Slurm srun, or none."""
    env = envs.environment() if env is None else env
    torchrun = _torchrun(env)
    if torchrun is not None:
        return torchrun
    slurm = _slurm(env)
    if slurm is not None and _started_by_srun_pmi(env, slurm):
        return slurm
    return _mpi(env) or slurm or LaunchInfo(NONE)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first
