"""ChannelExecutor: collective_rpc over one message channel per worker.

Shared by the executors whose workers sit at the other end of a pipe or socket (spawned
processes, externally launched workers). Waiting watches every channel and, where the
workers are our own processes, their sentinels: a death or a deadline fails the call with
a typed error instead of a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.errors import ExecutorClosedError, ExecutorTimeoutError, WorkerDiedError, WorkerError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.distributed.protocol import RpcMethod, RpcReply, collect_replies, method_name, portable_method
from spmd_diffusion.distributed.shm_channel import ShmChannel


class ChannelExecutor(DiffusionExecutor):
    """Subclasses fill ``self.channels`` (rank order) in ``_init_executor``."""

    channels: list[ShmChannel]

    def _sentinel(self, rank: int) -> Any | None:
        """An object that becomes ready when rank's worker dies, if we can watch it."""
        return None

    def _exitcode(self, rank: int) -> int | None:
        return None

    @property
    def world_size(self) -> int:
        return len(self.channels)

    def _check_open(self) -> None:
        if self.is_closed or self.is_failed:
            state = "failed" if self.is_failed else "shut down"
            raise ExecutorClosedError(f"{type(self).__name__} is {state}")

    def _died(self, rank: int, name: str) -> WorkerDiedError:
        self.is_failed = True
        return WorkerDiedError(rank, self._exitcode(rank), name)

    def _wait_any(self, ranks: list[int], name: str, deadline: float | None) -> list[RpcReply]:
        """Replies from whichever of ``ranks`` answer first (at least one), watching for
        deaths; an empty list means the deadline passed."""
        sentinels = {self._sentinel(rank): rank for rank in ranks}
        sentinels.pop(None, None)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait([self.channels[r].conn for r in ranks] + list(sentinels), timeout=remaining)
        replies = []
        for rank in ranks:
            if self.channels[rank].conn in ready:
                try:
                    replies.append(self.channels[rank].recv())
                except (EOFError, OSError):
                    raise self._died(rank, name) from None
        answered = {reply.rank for reply in replies}
        for sentinel, rank in sentinels.items():
            # A worker may reply and then exit: read what it sent before calling it dead.
            if sentinel in ready and rank not in answered and not self.channels[rank].poll():
                raise self._died(rank, name)
        return replies

    def _gather(self, name: str, timeout: float | None) -> list[RpcReply]:
        """One reply from every rank, watching for deaths and the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: dict[int, RpcReply] = {}
        while len(replies) < self.world_size:
            pending = [rank for rank in range(self.world_size) if rank not in replies]
            arrived = self._wait_any(pending, name, deadline)
            if not arrived and deadline is not None and time.monotonic() >= deadline:
                self.is_failed = True
                raise ExecutorTimeoutError(name, timeout, pending)
            for reply in arrived:
                replies[reply.rank] = reply
        return [replies[rank] for rank in range(self.world_size)]

    def _send(self, rank: int, message: tuple, name: str) -> None:
        try:
            self.channels[rank].send(message)
        except (BrokenPipeError, EOFError, OSError):
            raise self._died(rank, name) from None

    def _broadcast(self, message: tuple, name: str) -> None:
        for rank in range(self.world_size):
            self._send(rank, message, name)

    def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        self._check_open()
        if unique_reply_rank is not None and not 0 <= unique_reply_rank < self.world_size:
            raise ValueError(f"unique_reply_rank {unique_reply_rank} is outside 0..{self.world_size - 1}")
        name = method_name(method)
        self._broadcast(("call", portable_method(method), tuple(args), kwargs, unique_reply_rank), name)
        return collect_replies(method, self._gather(name, timeout), unique_reply_rank)

    def execute_stream(
        self,
        batches: list[list[OmniDiffusionRequest]],
        on_output: Callable[[DiffusionOutput], Any],
    ) -> None:
        """Hand the next batch to whichever replica is free (all its members), keep its
        leader's output."""
        self._check_open()
        layout = self.od_config.parallel_layout(self.world_size)
        timeout = self.od_config.generate_timeout
        pending = list(range(len(batches)))[::-1]  # pop() takes batches in order
        busy: dict[int, tuple[float | None, set[int]]] = {}  # leader -> (deadline, members yet to answer)
        stopped = False
        while (pending and not stopped) or busy:
            for replica, leader in enumerate(layout.leader_ranks()):
                if leader not in busy and pending and not stopped:
                    message = ("call", "generate", ([*batches[pending.pop()]],), None, None)
                    members = layout.replica_ranks(replica)
                    for member in members:
                        self._send(member, message, "generate")
                    deadline = None if timeout is None else time.monotonic() + timeout
                    busy[leader] = (deadline, set(members))
            waiting = sorted(rank for _, members in busy.values() for rank in members)
            deadlines = [deadline for deadline, _ in busy.values() if deadline is not None]
            for reply in self._wait_any(waiting, "generate", min(deadlines) if deadlines else None):
                if reply.failure is not None:
                    raise WorkerError("generate", [reply.failure])
                leader = layout.replica_ranks(layout.replica_index(reply.rank))[0]
                busy[leader][1].discard(reply.rank)
                if reply.rank == leader and on_output(reply.value) is False:
                    stopped = True
                if not busy[leader][1]:
                    del busy[leader]
            late = [leader for leader, (deadline, _) in busy.items() if deadline is not None and time.monotonic() >= deadline]
            if late:
                self.is_failed = True
                raise ExecutorTimeoutError("generate", timeout, late)
