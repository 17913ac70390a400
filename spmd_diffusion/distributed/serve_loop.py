"""The one worker serve loop, shared by every transport.

A spawned ``mp`` worker, every SPMD rank (rank 0's own worker on its thread included) and
an external worker all run :func:`serve_worker` over their end of the channel: receive an
:class:`~.protocol.RpcRequest`, answer it with one :class:`~.protocol.RpcReply`, until told
to stop. :func:`run_worker_rank` adds the start of a rank's life: wait for START (or ABORT),
load the worker, report how that went.
"""

# ruff: noqa: PLC0415 - project modules load where used (worker): they pull in heavy modules or
# import back into this one

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from spmd_diffusion.data import DEFERRED
from spmd_diffusion.distributed.protocol import (
    MessageKind,
    RpcReply,
    RpcRequest,
    answer,
    failure_from_exception,
)

logger = logging.getLogger(__name__)


class WorkerEndpoint(Protocol):
    """A worker's end of a channel: requests in, replies out."""

    def recv(self) -> RpcRequest: ...

    def send(self, reply: RpcReply) -> None: ...


class CallChannel:
    """What a running call may do besides returning: send step notes to the engine and read
    the signals it sent meanwhile, between steps, without waiting. Other messages read on the
    way (a collective call sent while this replica was busy) are kept, in order, for the serve
    loop. An endpoint that cannot look without waiting (gloo under torchrun) shows no signals."""

    def __init__(self, endpoint: WorkerEndpoint, rank: int) -> None:
        self.endpoint = endpoint
        self.rank = rank
        self.call_id = 0
        self.kept: deque[RpcRequest] = deque()
        self._sending = threading.Lock()  # the serve loop and the output writer both send

    def send(self, reply: RpcReply) -> None:
        with self._sending:
            self.endpoint.send(reply)

    def note(self, value: Any) -> None:
        notify = getattr(self.endpoint, "notify", self.endpoint.send)
        with self._sending:
            notify(RpcReply(self.rank, value, None, self.call_id))

    def answer_later(self) -> Callable[..., None]:
        """The running call's answer, to be given by another thread (``answer(value)`` or
        ``answer(error=exc)``) after the call returned ``DEFERRED``."""
        call_id, notify = self.call_id, getattr(self.endpoint, "notify", self.endpoint.send)

        def answer(value: Any = None, error: BaseException | None = None) -> None:
            failure = None if error is None else failure_from_exception(self.rank, error)
            with self._sending:
                notify(RpcReply(self.rank, None if error is not None else value, failure, call_id))

        return answer

    def signals(self) -> list[dict[str, Any]]:
        poll = getattr(self.endpoint, "poll_request", None)
        found: list[dict[str, Any]] = []
        while poll is not None:
            request = poll()
            if request is None:
                break
            if request.kind is MessageKind.SIGNAL:
                found.append(
                    request.args[0] if request.args and isinstance(request.args[0], dict) else {}
                )
            else:
                self.kept.append(request)
        return found

    def recv(self) -> RpcRequest:
        return self.kept.popleft() if self.kept else self.endpoint.recv()


@dataclass(frozen=True)
class WorkerPlacement:
    """Where a worker sits in the job (its device follows from ``local_rank``).

    ``one_node``: every rank of the job is on this node, so its groups stay on loopback;
    None derives it from the sizes (a Ray GPU actor sees one GPU, so its local sizes are
    1 while the job may still be on one node)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    one_node: bool | None = None


class UnloadedWorker:
    """Stands in for a worker whose model failed to load: every call reports that failure."""

    call_channel = None  # what the serve loop sets and reads on any worker

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def finish_outputs(self) -> None:
        """It wrote nothing."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            f"this rank's worker failed to load: {type(self.error).__name__}: {self.error}"
        )


def load_worker(
    od_config: Any, placement: WorkerPlacement, rendezvous: Any
) -> tuple[Any, RpcReply]:
    """This rank's DiffusionWorker and the reply that tells the engine how loading went."""
    from spmd_diffusion.worker import DiffusionWorker

    rank = placement.rank
    try:
        store = rendezvous.connect(rank) if rendezvous is not None else None
        worker = DiffusionWorker(
            od_config,
            rank=rank,
            local_rank=placement.local_rank,
            world_size=placement.world_size,
            local_world_size=placement.local_world_size,
            store=store,
            one_node=placement.one_node,
        )
        return worker, RpcReply(rank, "ready")
    except Exception as exc:  # noqa: BLE001 - the engine reports it, with the rank
        return UnloadedWorker(exc), RpcReply(rank, None, failure_from_exception(rank, exc))


def serve_worker(worker: Any, rank: int, endpoint: WorkerEndpoint) -> RpcRequest | None:
    """Answer requests until SHUTDOWN or DISCONNECT (acknowledged) or ABORT (the engine is
    gone: not answered), returning that request, or until the channel closes (None). An
    exception inside a call becomes its reply; only a BaseException that is not an
    Exception (SystemExit, KeyboardInterrupt) escapes."""
    channel = CallChannel(endpoint, rank)
    while True:
        try:
            request = channel.recv()
        except (EOFError, OSError):
            return None
        except Exception as exc:  # noqa: BLE001 - a malformed message: say so, keep serving
            endpoint.send(RpcReply(rank, None, failure_from_exception(rank, exc), 0))
            continue
        if request.kind is MessageKind.ABORT:
            return request
        if request.kind is MessageKind.SIGNAL:
            continue  # meant for a call that has ended
        if request.kind in (MessageKind.SHUTDOWN, MessageKind.DISCONNECT):
            if hasattr(worker, "finish_outputs"):
                worker.finish_outputs()  # every deferred answer leaves before the acknowledgement
            channel.send(RpcReply(rank, request.kind.name.lower(), None, request.call_id))
            return request
        if request.kind is MessageKind.CALL:
            channel.call_id = request.call_id
            if hasattr(worker, "call_channel"):
                worker.call_channel = channel
            try:
                reply = answer(worker, rank, request)
            finally:
                if hasattr(worker, "call_channel"):
                    worker.call_channel = None
            if reply.value is DEFERRED:  # the output writer answers it; this loop serves on
                finish = getattr(endpoint, "finish_deferred", None)
                if finish is not None:
                    finish()
                continue
        else:
            error = RuntimeError(f"unexpected {request.kind.name} message while serving")
            reply = RpcReply(rank, None, failure_from_exception(rank, error), request.call_id)
        try:
            channel.send(reply)
        except (EOFError, OSError):
            return None
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
            channel.send(RpcReply(rank, None, failure_from_exception(rank, exc), request.call_id))


def run_worker_rank(
    endpoint: WorkerEndpoint,
    placement: WorkerPlacement,
    loaded: Callable[[Any], None] | None = None,
) -> int:
    """A worker rank's life: START (load and report) or ABORT, then serve. Returns the
    rank's exit code: 0 after a clean shutdown, an ABORT's code otherwise (before start-up,
    or after an interrupted engine left). ``loaded`` is told the worker once it exists (rank
    0's own worker may also be called on other threads)."""
    request = endpoint.recv()
    if request.kind is MessageKind.ABORT:
        return int(request.args[0])
    if request.kind is not MessageKind.START:
        raise RuntimeError(f"expected START, got {request.kind.name}")
    od_config, rendezvous = request.args
    worker, reply = load_worker(od_config, placement, rendezvous)
    if loaded is not None and reply.ok:
        loaded(worker)
    endpoint.send(reply._replace(call_id=request.call_id))
    try:
        last = serve_worker(worker, placement.rank, endpoint)
    finally:
        if not isinstance(worker, UnloadedWorker):
            worker.shutdown()
    return int(last.args[0]) if last is not None and last.kind is MessageKind.ABORT else 0
