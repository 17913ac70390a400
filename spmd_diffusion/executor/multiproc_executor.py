"""MultiProcDiffusionExecutor (``mp``): the default when no launcher started the job.

Spawns ``num_gpus`` worker processes (one per GPU, or CPU workers where there is none)
and talks to each over a :class:`~spmd_diffusion.distributed.shm_channel.ShmChannel` (a pipe
for control messages, shared memory for large results). Every wait also watches the worker
processes' sentinels, so a worker that dies fails the pending call at once. Workers whose
replicas span several processes meet in a file store (nothing listens on the network).
"""

# ruff: noqa: PLC0415 - project modules load where used (errors, utils.logs): they pull in heavy
# modules or import back into this one

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import WireEndpoint
from spmd_diffusion.distributed.rendezvous import RendezvousServer
from spmd_diffusion.distributed.serve_loop import WorkerPlacement, run_worker_rank
from spmd_diffusion.distributed.shm_channel import ShmChannel
from spmd_diffusion.distributed.transport import ChannelTransport
from spmd_diffusion.executor.rpc_executor import RpcExecutor

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0
MAIN_GUARD_HINT = (
    "the mp executor starts its worker processes with 'spawn', which imports your script again "
    'in each of them: put the code that builds the engine under `if __name__ == "__main__":` '
    "(see the README's Python example)"
)


PARENT_CHECK_S = 1.0


def exit_with_parent(parent_pid: int) -> None:
    """End this worker when its parent is gone (killed, or ended by a signal it did not
    handle), so no orphan keeps a GPU or a core busy. A watcher thread, not the Linux
    parent-death signal: that one fires when the parent's spawning *thread* ends."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="spmd-diffusion-parent-watch", daemon=True).start()


def worker_main(placement: WorkerPlacement, channel: ShmChannel, parent_pid: int) -> None:
    """Body of one worker process: the serve loop every rank runs."""
    from spmd_diffusion.utils.logs import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    exit_with_parent(parent_pid)
    setup_logging(placement.rank)
    run_worker_rank(WireEndpoint(channel), placement)


class MultiProcDiffusionExecutor(RpcExecutor):
    spmd = False
    uses_multiproc = True
    writes_outputs = True

    @classmethod
    def planned_world_size(cls, od_config: OmniDiffusionConfig) -> int:
        return od_config.num_gpus

    def _init_executor(self) -> None:
        self._open_calls()
        size = self.od_config.num_gpus
        layout = self.od_config.parallel_layout(
            size
        )  # refuses a tp x cfg that does not divide num_gpus
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        channels = []
        for rank in range(size):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(
                target=worker_main,
                args=(WorkerPlacement(rank, size, rank, size), ShmChannel(child_end), os.getpid()),
                name=f"spmd-diffusion-worker-{rank}",
                daemon=True,
            )
            try:
                process.start()
            except RuntimeError as exc:
                if "bootstrapping phase" not in str(exc):
                    raise
                raise RuntimeError(MAIN_GUARD_HINT) from None
            child_end.close()
            self.processes.append(process)
            channels.append(ShmChannel(parent_end))
        self.transport = ChannelTransport(
            channels, [p.sentinel for p in self.processes], self._exitcode
        )
        self.rendezvous = RendezvousServer(size, one_node=True) if layout.replica_size > 1 else None
        try:
            self.start_workers(
                (self.od_config, self.rendezvous and self.rendezvous.rendezvous),
                self.od_config.startup_timeout,
            )
        except BaseException:
            self.is_failed = True
            self.shutdown()
            raise
        logger.info("started %d worker process(es)", size)

    def _exitcode(self, rank: int) -> int | None:
        self.processes[rank].join(0.1)
        return self.processes[rank].exitcode

    def check_health(self) -> None:
        self._check_open()
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                from spmd_diffusion.errors import WorkerDiedError

                error = WorkerDiedError(rank, self._exitcode(rank), "check_health")
                self._fail(error)
                raise error
        super().check_health()

    def shutdown(self) -> None:
        """Ask every worker to stop, then terminate, then kill what is left."""
        if getattr(self, "is_closed", True):
            return
        self.is_closed = True
        processes = getattr(self, "processes", [])
        hurry = self.is_failed or self.interrupted  # a worker may be stuck in (or busy with) a call
        if not hurry and processes:
            self.stop_workers(SHUTDOWN_GRACE_S)
        deadline = time.monotonic() + (1.0 if hurry else SHUTDOWN_GRACE_S)
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                if not self.interrupted:  # Ctrl-C: the user asked for it, no news
                    log = logger.info if hurry else logger.warning
                    log("worker %s did not stop in time; terminating", process.name)
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        if getattr(self, "transport", None) is not None:
            self.transport.close()
        if getattr(self, "rendezvous", None) is not None:
            self.rendezvous.close()
