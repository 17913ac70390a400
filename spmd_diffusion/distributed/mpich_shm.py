"""Stale shared-memory segments of MPICH under srun, and their removal before a requeue.

pip's MPICH (4.x) names a job's node-local segments ``mpich_shm_<world id>_<node>`` and
``mpich_vci_<world id>_<node>`` in /dev/shm, the world id being the 32-bit FNV-1a hash of
the PMI job id, which srun's pmi2 plugin sets to ``<job id>.<step id>`` (checked: job 1,
step 0 -> ``mpich_shm_eb421bf2_0``). A step that is killed leaves them; a requeued job keeps
its id and numbers its steps from 0 again, so its rerun opens the stale segment and fails
in MPI_Init ("Message truncated"). The sbatch script runs this on every node before the
rerun's step::

    python -m spmd_diffusion.distributed.mpich_shm "$SLURM_JOB_ID"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SHM_DIR = Path("/dev/shm")
STEPS_CHECKED = 256


def world_id(pmi_job_id: str) -> str:
    """MPICH's world id of a PMI job id (FNV-1a, 32 bits, lower-case hex)."""
    value = 0x811C9DC5
    for byte in pmi_job_id.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return f"{value:x}"


def job_segments(job_id: str, shm_dir: Path = SHM_DIR, steps: int = STEPS_CHECKED) -> list[Path]:
    """This user's segments of any step of Slurm job ``job_id`` on this node."""
    prefixes = {
        f"mpich_{kind}_{world_id(f'{job_id}.{step}')}_"
        for step in range(steps)
        for kind in ("shm", "vci")
    }
    found = []
    try:
        entries = list(shm_dir.iterdir())
    except OSError:
        return found
    uid = os.geteuid()
    for path in entries:
        name = path.name
        if name.startswith("mpich_") and name[: name.rfind("_") + 1] in prefixes:
            try:
                if path.stat().st_uid == uid:
                    found.append(path)
            except OSError:
                continue
    return found


def remove_job_segments(job_id: str, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove them (every step of the job must be over); the removed paths."""
    removed = []
    for path in job_segments(job_id, shm_dir):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m spmd_diffusion.distributed.mpich_shm SLURM_JOB_ID", file=sys.stderr)
        return 2
    removed = remove_job_segments(argv[0])
    if removed:
        print(
            f"removed {len(removed)} stale MPICH segment(s) of job {argv[0]}: "
            + " ".join(path.name for path in removed)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
