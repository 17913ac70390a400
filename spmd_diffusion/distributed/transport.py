"""Transports: the engine's side of the channels to its workers. They move messages only.

Every executor built on :class:`~spmd_diffusion.executor.rpc_executor.RpcExecutor` is one of
these plus how it starts its workers:

- :class:`ChannelTransport`: one pipe or socket per worker (``mp``: spawned processes,
  whose deaths are watched through their sentinels; ``external``: sockets to workers
  started elsewhere);
- :class:`LocalTransport`: one worker on a thread of this process (``uni``);
- :class:`SPMDTransport`: rank 0's own worker on a thread plus the launcher's control plane
  to every other rank (``mpi``, ``torchrun``).

``poll`` waits for the first reply (or the timeout) and returns whatever has arrived; a
worker that is gone raises :class:`~spmd_diffusion.errors.WorkerDiedError` naming its rank.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from multiprocessing.connection import wait
from typing import Any

from spmd_diffusion.distributed.control.base import Backoff, ControlPlane
from spmd_diffusion.distributed.local_worker import LocalWorker
from spmd_diffusion.distributed.protocol import (
    RpcReply,
    RpcRequest,
    reply_from_wire,
    request_to_wire,
)
from spmd_diffusion.errors import ConnectionLostError, WorkerDiedError, gloo_brief


class Transport(ABC):
    world_size: int

    @abstractmethod
    def send(self, rank: int, request: RpcRequest) -> None:
        """Hand ``request`` to ``rank`` without waiting for it to be served."""

    @abstractmethod
    def poll(self, ranks: Collection[int], timeout: float | None) -> list[RpcReply]:
        """Replies from ``ranks``, waiting up to ``timeout`` seconds for the first."""

    def run_inline(self, rank: int, request: RpcRequest) -> RpcReply | None:
        """Answer ``request`` for ``rank`` on the calling thread, if that rank's worker lives
        in this process and is idle; None: send it instead."""
        return None

    def signal(self, rank: int, request: RpcRequest) -> bool:
        """Hand a SIGNAL to ``rank``'s running call (by default in order on its channel, which
        the call looks at between steps); False where the call could not see it."""
        self.send(rank, request)
        return True

    def close(self) -> None:  # noqa: B027 - optional: most transports hold nothing to release
        """Release the channels (the workers' lives are their executor's business)."""


class ChannelTransport(Transport):
    """One duplex channel per worker (ShmChannel over a pipe, or over a socket)."""

    def __init__(
        self,
        channels: list[Any],
        sentinels: list[Any] | None = None,
        exitcode: Callable[[int], int | None] | None = None,
    ) -> None:
        self.channels = channels
        self.world_size = len(channels)
        self.sentinels = sentinels
        self.exitcode = exitcode or (lambda rank: None)

    def _died(self, rank: int) -> WorkerDiedError:
        return WorkerDiedError(rank, self.exitcode(rank))

    def send(self, rank: int, request: RpcRequest) -> None:
        try:
            self.channels[rank].send(request_to_wire(request))
        except (BrokenPipeError, EOFError, OSError):
            raise self._died(rank) from None

    def poll(self, ranks: Collection[int], timeout: float | None) -> list[RpcReply]:
        connections = {self.channels[rank].conn: rank for rank in ranks}
        sentinels = {self.sentinels[rank]: rank for rank in ranks} if self.sentinels else {}
        ready = wait(list(connections) + list(sentinels), timeout=timeout)
        replies: list[RpcReply] = []
        for connection in ready:
            rank = connections.get(connection)
            if rank is None:
                continue
            try:
                while True:
                    replies.append(reply_from_wire(self.channels[rank].recv()))
                    if not self.channels[rank].poll():
                        break
            except (EOFError, OSError):
                raise self._died(rank) from None
        answered = {reply.rank for reply in replies}
        for sentinel in ready:
            rank = sentinels.get(sentinel)
            # A worker may reply and then exit: read what it sent before calling it dead.
            if rank is not None and rank not in answered and not self.channels[rank].poll():
                raise self._died(rank)
        return replies

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


class LocalTransport(Transport):
    """The uni executor: one worker, on a thread."""

    def __init__(self, local: LocalWorker) -> None:
        self.local = local
        self.world_size = 1

    def send(self, rank: int, request: RpcRequest) -> None:
        self.local.submit(request)

    def signal(self, rank: int, request: RpcRequest) -> bool:
        self.local.signal(request)
        return True

    def run_inline(self, rank: int, request: RpcRequest) -> RpcReply | None:
        return self.local.run_inline(request)

    def poll(self, ranks: Collection[int], timeout: float | None) -> list[RpcReply]:
        return self.local.wait(timeout)


class SPMDTransport(Transport):
    """Rank 0 of an SPMD job: its own worker on a thread, the others over the control plane.

    Where the control plane can deliver replies into a queue (gloo, whose replies arrive on a
    thread), rank 0's worker replies into the same queue and the engine blocks on it. MPI
    replies must be polled: then the engine polls with :class:`Backoff`, spinning only
    just after it sent something (a reply is likely within microseconds), sleeping in short
    steps otherwise, so a waiting engine neither burns a core nor starves rank 0's worker
    thread of the GIL."""

    SPIN_AFTER_SEND_S = 0.005

    def __init__(self, control: ControlPlane, local: LocalWorker) -> None:
        self.control = control
        self.local = local
        self.world_size = control.size
        self.shared_inbox = control.share_inbox(local.replies)
        self.spinning = Backoff()
        self.sleeping = Backoff(spin_s=0.0)
        self.last_send = 0.0

    def send(self, rank: int, request: RpcRequest) -> None:
        self.last_send = time.monotonic()
        if rank == 0:
            self.local.submit(request)
        else:
            self.control.send(rank, request_to_wire(request))

    def signal(self, rank: int, request: RpcRequest) -> bool:
        if rank == 0:
            self.local.signal(request)
            return True
        if not self.control.can_peek:
            return False  # gloo cannot look for a message without waiting for it
        self.send(rank, request)
        return True

    def run_inline(self, rank: int, request: RpcRequest) -> RpcReply | None:
        return self.local.run_inline(request) if rank == 0 else None

    def poll(self, ranks: Collection[int], timeout: float | None) -> list[RpcReply]:
        if self.shared_inbox:
            return [_reply(item) for item in self.local.wait(timeout)]
        remote = [rank for rank in ranks if rank != 0]
        if not remote:
            # Only rank 0's own worker is awaited (mpiexec -n 1, or its replica alone): block on
            # its queue. Polling it would wake this thread every few ms and take the GIL from
            # the worker thread beside it while it runs a batch.
            return self.local.wait(timeout)
        replies: list[RpcReply] = []

        def arrived() -> bool:
            replies.extend(self.local.poll())
            if remote:
                replies.extend(map(reply_from_wire, self.control.poll_replies(remote)))
            return bool(replies)

        backoff = (
            self.spinning
            if time.monotonic() - self.last_send < self.SPIN_AFTER_SEND_S
            else self.sleeping
        )
        backoff.wait(arrived, None if timeout is None else time.monotonic() + timeout)
        return replies


def _reply(item: Any) -> RpcReply:
    """An item of a shared inbox: a local reply, a remote one (a plain tuple), or the error
    that ended the control plane's reply thread."""
    if isinstance(item, BaseException):
        raise ConnectionLostError(gloo_brief(item)) from item
    return reply_from_wire(item)
