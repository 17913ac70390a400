"""A 2-rank job that fails on purpose; tests/distributed/test_spmd_failures.py runs it under
each launcher.

    mpiexec -n 2 python tests/multirank/failure_job.py MODE
    torchrun --nproc-per-node 2 tests/multirank/failure_job.py MODE

MODE: kill (rank 1 is SIGKILLed mid-call), fatal (rank 1 raises outside any RPC's reach),
timeout (rank 1 overruns a call's timeout), rank0-error (rank 0's own code raises).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.entrypoints.spmd import spmd_engine


def kill_rank_1(worker) -> None:
    if worker.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def exit_on_rank_1(worker) -> None:
    if worker.rank == 1:
        raise SystemExit(
            "rank 1 gives up"
        )  # not an Exception: RPC error handling does not catch it


def stall_on_rank_1(worker) -> None:
    if worker.rank == 1:
        time.sleep(3600)  # far beyond the test's limit: only the call's timeout can end it


def main(mode: str) -> None:
    with spmd_engine(OmniDiffusionConfig(model="tiny-dit")) as engine:
        if engine is None:
            return
        print("ready", flush=True)
        if mode == "kill":
            engine.collective_rpc(kill_rank_1)
        elif mode == "fatal":
            engine.collective_rpc(exit_on_rank_1)
        elif mode == "timeout":
            engine.collective_rpc(stall_on_rank_1, timeout=2)
        elif mode == "rank0-error":
            raise RuntimeError("rank 0 found a bug")
        time.sleep(3600)  # never reached in a correct build: the job must already be over


if __name__ == "__main__":
    main(sys.argv[1])
