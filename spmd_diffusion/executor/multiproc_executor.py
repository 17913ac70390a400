"""MultiProcDiffusionExecutor (``mp``): the default when no launcher started the job.

Spawns ``num_gpus`` worker processes (one per GPU, or CPU workers where there is none)
and talks to each over a :class:`~spmd_diffusion.distributed.shm_channel.ShmChannel` (a pipe for
control messages, shared memory for large results). Every wait also watches the worker
processes' sentinels, so a worker that dies fails the pending call at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import time
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.executor.channel_executor import ChannelExecutor
from spmd_diffusion.distributed.protocol import RpcReply, collect_replies, failure_from_exception, serve_channel
from spmd_diffusion.distributed.shm_channel import ShmChannel

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 10.0


def worker_main(
    od_config: OmniDiffusionConfig,
    rank: int,
    world_size: int,
    channel: ShmChannel,
    store_address: tuple[str, int] | None = None,
) -> None:
    """Body of one worker process: load, say ready, then serve calls until shutdown."""
    from spmd_diffusion.utils.logs import setup_logging
    from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    setup_logging(rank)
    try:
        store = None
        if store_address is not None:
            from spmd_diffusion.distributed.work_queue import connect_store

            store = connect_store(*store_address)
        worker = DiffusionWorker(
            od_config, rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size, store=store
        )
    except Exception as exc:  # noqa: BLE001 - report why loading failed, then exit
        channel.send(RpcReply(rank=rank, failure=failure_from_exception(rank, exc)))
        return
    channel.send(RpcReply(rank=rank, value="ready"))
    serve_channel(worker, rank, channel)
    worker.shutdown()


class MultiProcDiffusionExecutor(ChannelExecutor):
    spmd = False

    uses_multiproc = True

    def _init_executor(self) -> None:
        context = multiprocessing.get_context("spawn")
        size = self.od_config.num_gpus
        self.od_config.parallel_layout(size)  # refuses a tp x cfg that does not divide num_gpus
        self.processes: list[Any] = []
        self.channels = []
        store_address = None
        if self.od_config.replica_size > 1:  # the workers' process group meets at this store
            from spmd_diffusion.distributed.work_queue import serve_store

            self.store, port = serve_store()
            store_address = ("127.0.0.1", port)
        for rank in range(size):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(
                target=worker_main,
                args=(self.od_config, rank, size, ShmChannel(child_end), store_address),
                name=f"spmd-diffusion-worker-{rank}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self.processes.append(process)
            self.channels.append(ShmChannel(parent_end))
        try:
            collect_replies("load", self._gather("load", self.od_config.startup_timeout), None)
        except BaseException:
            self.is_failed = True
            self.shutdown()
            raise
        logger.info("started %d worker process(es)", size)

    def _sentinel(self, rank: int) -> Any:
        return self.processes[rank].sentinel

    def _exitcode(self, rank: int) -> int | None:
        self.processes[rank].join(0.1)
        return self.processes[rank].exitcode

    def check_health(self) -> None:
        self._check_open()
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                raise self._died(rank, "check_health")
        super().check_health()

    def shutdown(self) -> None:
        """Ask every worker to stop, then terminate, then kill what is left."""
        if self.is_closed:
            return
        self.is_closed = True
        for channel, process in zip(self.channels, self.processes):
            if process.is_alive():
                try:
                    channel.send(("shutdown",))
                except (BrokenPipeError, OSError):
                    pass
        # A failed executor may have a worker stuck in a call: do not wait long for it.
        deadline = time.monotonic() + (1.0 if self.is_failed else SHUTDOWN_GRACE_S)
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                log = logger.info if self.is_failed else logger.warning
                log("worker %s did not stop in time; terminating", process.name)
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for channel in self.channels:
            channel.close()
