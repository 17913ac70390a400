"""ChannelExecutor: collective_rpc over one message channel per worker.

Shared by the executors whose workers sit at the other end of a pipe or socket (spawned
processes, externally launched workers). Waiting watches every channel and, where the
workers are our own processes, their sentinels: a death or a deadline fails the call with
a typed error instead of a hang.
"""

from __future__ import annotations

import time
from multiprocessing.connection import wait
from typing import Any

from spmd_diffusion.errors import ExecutorClosedError, ExecutorTimeoutError, WorkerDiedError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.rpc import RpcMethod, RpcReply, collect_replies, method_name, portable_method
from spmd_diffusion.shm_channel import ShmChannel


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

    def _gather(self, name: str, timeout: float | None) -> list[RpcReply]:
        """One reply from every rank, watching for deaths and the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: dict[int, RpcReply] = {}
        while len(replies) < self.world_size:
            pending = [rank for rank in range(self.world_size) if rank not in replies]
            sentinels = {self._sentinel(rank): rank for rank in pending} if pending else {}
            sentinels.pop(None, None)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([self.channels[r].conn for r in pending] + list(sentinels), timeout=remaining)
            if not ready:
                self.is_failed = True
                raise ExecutorTimeoutError(name, timeout, pending)
            for rank in pending:
                if self.channels[rank].conn in ready:
                    try:
                        replies[rank] = self.channels[rank].recv()
                    except (EOFError, OSError):
                        raise self._died(rank, name) from None
            for sentinel, rank in sentinels.items():
                # A worker may reply and then exit: read what it sent before calling it dead.
                if sentinel in ready and rank not in replies and not self.channels[rank].poll():
                    raise self._died(rank, name)
        return [replies[rank] for rank in range(self.world_size)]

    def _broadcast(self, message: tuple, name: str) -> None:
        for rank, channel in enumerate(self.channels):
            try:
                channel.send(message)
            except (BrokenPipeError, EOFError, OSError):
                raise self._died(rank, name) from None

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
