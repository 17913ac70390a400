"""SPMD executors: every rank runs the same program; rank 0 is the engine.

Rank 0 broadcasts ``(seq, method, args, kwargs, reply_rank)`` over the control plane, runs
the call on its own worker too (no GPU idles), then collects one reply per other rank with
a deadline. The other ranks live in :func:`serve_as_worker` until rank 0 shuts down.

- :class:`MPIExecutor` (``mpi``): the control plane is mpi4py (mpirun, mpiexec, srun+PMI).
- :class:`TorchDistributedExecutor` (``torchrun``): a gloo CPU group (torchrun, srun).

Constructing either on a rank other than 0 serves calls there and then raises
:class:`WorkerRankDone` (a ``SystemExit``), so ``DiffusionEngine(config)`` returns on rank 0
only; use :func:`spmd_diffusion.spmd.spmd_engine` where every rank must carry on.
"""

from __future__ import annotations

import atexit
import logging
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spmd_diffusion.distributed.control import Backoff, ControlPlane, get_control_plane
from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.errors import ExecutorClosedError, ExecutorTimeoutError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.distributed.launcher import detect_launcher
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.distributed.protocol import (
    RpcMethod,
    RpcReply,
    collect_replies,
    failure_from_exception,
    method_name,
    portable_method,
    run_rpc,
)
from spmd_diffusion.distributed.work_queue import ResultMailbox, WorkQueue, connect_store, serve_store, store_host

if TYPE_CHECKING:
    from spmd_diffusion.parallel.mesh import ParallelLayout

logger = logging.getLogger(__name__)

START, ABORT, CALL, STREAM, SHUTDOWN = "start", "abort", "call", "stream", "shutdown"


class WorkerRankDone(SystemExit):
    """A rank other than 0 finished serving (rank 0 shut the engine down)."""


class UnloadedWorker:
    """Stands in for a worker whose model failed to load: every call reports that failure."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"this rank's worker failed to load: {type(self.error).__name__}: {self.error}")


def load_worker(od_config: OmniDiffusionConfig, control: ControlPlane, store: Any) -> tuple[Any, RpcReply]:
    """This rank's DiffusionWorker and the reply that tells rank 0 how loading went."""
    from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

    try:
        worker = DiffusionWorker(
            od_config,
            rank=control.rank,
            local_rank=control.local_rank,
            world_size=control.size,
            local_world_size=control.local_size,
            store=store,
        )
        return worker, RpcReply(rank=control.rank, value="ready")
    except Exception as exc:  # noqa: BLE001 - rank 0 reports it for every rank
        return UnloadedWorker(exc), RpcReply(rank=control.rank, failure=failure_from_exception(control.rank, exc))


def fatal(control: ControlPlane, exc: BaseException) -> None:
    """An error outside any RPC: print it once, with the rank, and end the whole job."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    logger.critical("fatal error, ending the job:\n%s", text.rstrip())
    control.abort(1)


def serve_as_worker(control: ControlPlane) -> int:
    """A non-root rank's life: wait for rank 0's start (or abort), load, serve, return the exit code."""
    from spmd_diffusion.utils.logs import setup_logging

    setup_logging(control.rank)
    try:
        message = control.receive_broadcast()
        if message[0] == ABORT:
            return int(message[1])
        _, od_config, store_address = message
        store = connect_store(*store_address)
        worker, reply = load_worker(od_config, control, store)
        control.send_to_root((0, reply.value, reply.failure))
        while True:
            message = control.receive_broadcast()
            if message[0] == SHUTDOWN:
                break
            if message[0] == ABORT:
                return int(message[1])
            if message[0] == STREAM:
                _, seq, name, batches = message
                failure = serve_stream(worker, control, store, od_config, name, batches)
                control.send_to_root((seq, None, failure))
                continue
            _, seq, method, args, kwargs, reply_rank = message
            reply = run_rpc(worker, control.rank, method, args, kwargs)
            value = None if reply_rank is not None and reply_rank != control.rank else reply.value
            try:  # only the asked-for rank ships its result
                control.send_to_root((seq, value, reply.failure))
            except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                control.send_to_root((seq, None, failure_from_exception(control.rank, exc)))
        if not isinstance(worker, UnloadedWorker):
            worker.shutdown()
        return 0
    except BaseException as exc:  # noqa: BLE001 - anything here would leave rank 0 waiting
        fatal(control, exc)
        raise


def run_replica_stream(
    worker: Any,
    queue: WorkQueue,
    batches: list[list[OmniDiffusionRequest]],
    layout: ParallelLayout,
    rank: int,
    on_output: Callable[[DiffusionOutput], Any],
    step_callback: Callable[[], None] | None,
) -> None:
    """One rank's part of a stream: leaders take batches (and tell their replica which),
    members follow their leader; only leaders hand outputs on."""
    replica, leader, has_members = layout.replica_index(rank), layout.is_replica_leader(rank), layout.replica_size > 1
    step = 0
    while True:
        if leader:
            index = queue.take()
            if has_members:
                queue.announce(replica, step, index)
        else:
            index = queue.follow(replica, step)
        if index is None:
            return
        output = worker.generate(batches[index], step_callback=step_callback)
        if leader and on_output(output) is False:
            queue.stop()
        step += 1


def serve_stream(
    worker: Any, control: ControlPlane, store: Any, od_config: OmniDiffusionConfig, name: str, batches: list
) -> Any:
    """A non-root rank in a stream: compute, mail outputs to rank 0; returns a failure or None."""
    layout = od_config.parallel_layout(control.size)
    mailbox = ResultMailbox(store, name)
    try:
        run_replica_stream(
            worker, WorkQueue(store, name, len(batches)), batches, layout, control.rank,
            lambda output: mailbox.post(control.rank, output), None,
        )
        return None
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 with the rank
        return failure_from_exception(control.rank, exc)
    finally:
        if layout.is_replica_leader(control.rank):
            mailbox.post(control.rank, None, final=True)


class SPMDExecutor(DiffusionExecutor):
    """Base of the executors whose workers are the ranks of the job itself."""

    spmd = True
    control_backend = ""

    def _init_executor(self) -> None:
        self.control = get_control_plane(detect_launcher(), self.control_backend)
        if self.control.rank != 0:
            raise WorkerRankDone(serve_as_worker(self.control))
        self.world_size = self.control.size
        self.layout = self.od_config.parallel_layout(self.world_size)  # refuses a tp x cfg that does not divide
        self.seq = 0
        self.failure: BaseException | None = None
        self.store, port = serve_store()
        self.control.broadcast((START, self.od_config, (store_host(self.control.local_size, self.world_size), port)))
        self.control.serving = True
        self.worker, own = load_worker(self.od_config, self.control, self.store)
        atexit.register(self.shutdown)
        try:
            collect_replies("load", [own, *self._replies("load", 0, self.od_config.startup_timeout)], None)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%s ready: %s", type(self).__name__, self.control.describe())

    def _replies(self, name: str, seq: int, timeout: float | None) -> list[RpcReply]:
        others = list(range(1, self.world_size))
        deadline = None if timeout is None else time.monotonic() + timeout
        received = self.control.receive_from(others, deadline)
        missing = [rank for rank in others if rank not in received]
        if missing:
            self.is_failed = True
            self.failure = ExecutorTimeoutError(name, timeout, missing)
            raise self.failure
        replies = []
        for rank in others:
            reply_seq, value, failure = received[rank]
            if reply_seq != seq:  # cannot happen unless the protocol is broken
                self.is_failed = True
                self.failure = RuntimeError(f"rank {rank} answered call {reply_seq} during call {seq}")
                raise self.failure
            replies.append(RpcReply(rank, value, failure))
        return replies

    def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        if self.is_closed or self.is_failed:
            raise ExecutorClosedError(f"{type(self).__name__} is {'failed' if self.is_failed else 'shut down'}")
        if unique_reply_rank is not None and not 0 <= unique_reply_rank < self.world_size:
            raise ValueError(f"unique_reply_rank {unique_reply_rank} is outside 0..{self.world_size - 1}")
        self.seq += 1
        name = method_name(method)
        self.control.broadcast((CALL, self.seq, portable_method(method), tuple(args), kwargs, unique_reply_rank))
        own = run_rpc(self.worker, 0, method, args, kwargs)
        replies = [own, *self._replies(name, self.seq, timeout)]
        return collect_replies(method, replies, unique_reply_rank)

    def execute_stream(
        self,
        batches: list[list[OmniDiffusionRequest]],
        on_output: Callable[[DiffusionOutput], Any],
    ) -> None:
        """Every replica pulls batches from a shared queue until none are left; rank 0 (the
        leader of replica 0) computes too, and hands each output to ``on_output`` as soon as
        it arrives, between its own denoising steps. ``on_output`` returning False stops
        handing out new batches (batches already running still finish and are delivered)."""
        if self.is_closed or self.is_failed:
            raise ExecutorClosedError(f"{type(self).__name__} is {'failed' if self.is_failed else 'shut down'}")
        self.seq += 1
        name = f"stream-{self.seq}"
        queue = WorkQueue(self.store, name, len(batches))
        leaders = self.layout.leader_ranks()[1:]
        mailbox = ResultMailbox(self.store, name, leaders)
        self.control.broadcast((STREAM, self.seq, name, batches))
        error: BaseException | None = None

        def deliver(output: DiffusionOutput) -> None:
            nonlocal error
            if error is not None:
                return
            try:
                if on_output(output) is False:
                    queue.stop()
            except BaseException as exc:  # the consumer failed: stop, let the others finish
                error = exc
                queue.stop()

        def poll() -> None:
            for _, output in mailbox.poll():
                deliver(output)

        try:
            run_replica_stream(self.worker, queue, batches, self.layout, 0, deliver, poll)
        except BaseException as exc:
            error = exc
            queue.stop()
        self._finish_stream(mailbox, deliver)
        failures = self._replies("stream", self.seq, self.od_config.rpc_timeout)
        if error is not None:
            raise error
        collect_replies("stream", [RpcReply(0), *failures], None)

    def _finish_stream(self, mailbox: ResultMailbox, deliver: Callable[[DiffusionOutput], None]) -> None:
        """Wait for every other leader's last output; no news for a whole batch timeout is a
        timeout (the job then ends: a stuck rank cannot be stopped any other way)."""
        timeout = self.od_config.generate_timeout
        backoff = Backoff(max_sleep_s=0.01)  # each poll is a store round trip
        while not mailbox.done:
            arrived: list[tuple[int, Any]] = []

            def news() -> bool:
                arrived.extend(mailbox.poll())
                return bool(arrived) or mailbox.done

            deadline = None if timeout is None else time.monotonic() + timeout
            if not backoff.wait(news, deadline):
                self.is_failed = True
                self.failure = ExecutorTimeoutError("generate", timeout, sorted(mailbox.waiting_for))
                raise self.failure
            for _, output in arrived:
                deliver(output)

    def shutdown(self) -> None:
        """Release every rank. After a timed-out call a rank may still be busy, so a failed
        executor ends the whole job instead (nothing else can be sure to stop it)."""
        if self.is_closed:
            return
        self.is_closed = True
        atexit.unregister(self.shutdown)
        if self.is_failed:
            logger.critical("ending the job: %s", self.failure)
            self.control.abort(1)
            return
        self.control.broadcast((SHUTDOWN,))
        self.control.serving = False
        if not isinstance(self.worker, UnloadedWorker):
            self.worker.shutdown()


class MPIExecutor(SPMDExecutor):
    """SPMD over mpi4py: for mpirun/mpiexec, and srun with an MPI that speaks its PMI."""

    control_backend = "mpi"


class TorchDistributedExecutor(SPMDExecutor):
    """SPMD over a torch.distributed gloo group: for torchrun, and srun without MPI."""

    control_backend = "torch"
