"""RpcExecutor: calls with ids over a :class:`~spmd_diffusion.distributed.transport.Transport`.

Every built-in executor is this class plus how it starts its workers (spawned processes,
a thread, the ranks of an SPMD job, remote workers). It only moves messages: a call is an
:class:`RpcRequest` sent to some ranks and finished when each has replied.

Thread safety, by per-call ids: each call gets an id and its replies are routed to it by id,
so several threads may make calls on one executor and each gets its own results. Sends of
one call go out under one lock, so every rank sees calls in the same order (the members of
a tensor-parallel replica must agree on what they run next). One waiting thread at a time
reads the transport and routes whatever arrives to whichever call it belongs to; the others
sleep until it tells them. A rank serves its calls in order: a call behind a long batch
waits for it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from spmd_diffusion.data import DiffusionOutput, OutputsPending, StepNote
from spmd_diffusion.distributed.protocol import (
    MessageKind,
    RpcMethod,
    RpcReply,
    RpcRequest,
    collect_replies,
    method_name,
    portable_method,
)
from spmd_diffusion.distributed.transport import Transport
from spmd_diffusion.errors import (
    ExecutorClosedError,
    ExecutorTimeoutError,
    WorkerDiedError,
    WorkerError,
)
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor, ReplicaCall
from spmd_diffusion.request import OmniDiffusionRequest

POLL_SLICE_S = 0.1  # longest transport wait before the set of awaited ranks is refreshed
LOAD_GRACE_S = 5.0  # after one rank failed to load, how long the others get to report
KIND_NAMES = {MessageKind.START: "load", MessageKind.SHUTDOWN: "shutdown", MessageKind.CALL: "call"}


class PendingCall(ReplicaCall):
    """One call in flight: done when every rank in ``ranks`` has replied (or, for a start-up
    call, as soon as one rank reports a failure), or when ``error`` is set."""

    __slots__ = (
        "executor",
        "call_id",
        "name",
        "ranks",
        "reply_rank",
        "timeout",
        "deadline",
        "replica",
        "stop_at_failure",
        "replies",
        "error",
        "_failed",
        "on_note",
        "released",
    )

    def __init__(
        self,
        executor: RpcExecutor,
        call_id: int,
        name: str,
        ranks: list[int],
        reply_rank: int | None,
        timeout: float | None,
        replica: int = -1,
        stop_at_failure: bool = False,
    ) -> None:
        self.executor, self.call_id, self.name = executor, call_id, name
        self.ranks, self.reply_rank, self.timeout = ranks, reply_rank, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.replica = replica
        self.stop_at_failure = stop_at_failure
        self.replies: dict[int, RpcReply] = {}
        self.error: BaseException | None = None
        self._failed = False
        self.on_note: Any = None
        self.released = False

    def add(self, reply: RpcReply) -> None:
        self.replies[reply.rank] = reply
        self._failed = self._failed or reply.failure is not None

    @property
    def waiting_for(self) -> list[int]:
        return [rank for rank in self.ranks if rank not in self.replies]

    @property
    def done(self) -> bool:
        return (
            self.error is not None
            or len(self.replies) == len(self.ranks)
            or (self.stop_at_failure and self._failed)
        )

    def result(self) -> Any:
        """The value (or values, one per rank, when ``reply_rank`` is None); raises the call's
        error, or one WorkerError naming every failed rank."""
        self.executor.wait_all([self])
        if self.error is not None:
            raise self.error
        return collect_replies(self.name, list(self.replies.values()), self.reply_rank)


class RpcExecutor(DiffusionExecutor):
    """Subclasses set ``self.transport`` in ``_init_executor`` (after ``_open_calls()``)."""

    transport: Transport

    def _open_calls(self) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, PendingCall] = {}
        self._send_lock = threading.Lock()
        self._pump_lock = threading.Lock()
        self._routed = threading.Condition(threading.Lock())
        self.failure: BaseException | None = None

    @property
    def world_size(self) -> int:
        return self.transport.world_size

    def _check_open(self) -> None:
        if self.is_closed or self.is_failed:
            state = "failed" if self.is_failed else "shut down"
            raise ExecutorClosedError(
                f"{type(self).__name__} is {state}" + (f": {self.failure}" if self.failure else "")
            )

    def _fail(self, error: BaseException) -> None:
        """The executor cannot go on (a rank died or is stuck): every call in flight fails."""
        self.is_failed = True
        self.failure = self.failure or error
        with self._routed:
            for call in self._calls.values():
                call.error = call.error or error
            self._calls.clear()
            self._routed.notify_all()

    # -- starting calls ------------------------------------------------------------------------
    def start_call(
        self,
        ranks: Iterable[int],
        method: RpcMethod | None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        reply_rank: int | None = None,
        timeout: float | None = None,
        kind: MessageKind = MessageKind.CALL,
        replica: int = -1,
    ) -> PendingCall:
        """Send one request to each of ``ranks`` and return the call that awaits their replies."""
        if kind is MessageKind.CALL:
            self._check_open()
        ranks = list(ranks)
        name = method_name(method) if method is not None else KIND_NAMES[kind]
        call = PendingCall(
            self,
            next(self._ids),
            name,
            ranks,
            reply_rank,
            timeout,
            replica,
            kind is MessageKind.START,
        )
        request = RpcRequest(
            kind,
            call.call_id,
            portable_method(method) if method is not None else None,
            tuple(args),
            kwargs,
            reply_rank,
        )
        with self._routed:
            self._calls[call.call_id] = call
        # A collective call with no deadline may run rank 0's share on this thread, after
        # the others have theirs (see LocalWorker.run_inline); still under the send lock, so
        # no other call can slip in between on any rank.
        inline = kind is MessageKind.CALL and timeout is None and replica < 0 and 0 in ranks
        with self._send_lock:
            for rank in ranks:
                if inline and rank == 0:
                    continue
                self._send(rank, request, name)
            if inline:
                reply = self.transport.run_inline(0, request)
                if reply is None:
                    self._send(0, request, name)
                else:
                    self._route([reply])
        return call

    def _send(self, rank: int, request: RpcRequest, name: str) -> None:
        try:
            self.transport.send(rank, request)
        except WorkerDiedError as exc:
            exc.method = name
            self._fail(exc)
            raise

    # -- waiting -------------------------------------------------------------------------------
    def _route(self, replies: list[RpcReply]) -> None:
        notes = []
        with self._routed:
            for reply in replies:
                call = self._calls.get(reply.call_id)
                if call is None:
                    continue  # a reply to a call that already failed or timed out
                if isinstance(reply.value, StepNote):
                    if call.on_note is not None:
                        notes.append((call.on_note, reply.value))
                    continue
                if isinstance(reply.value, OutputsPending):
                    call.released = True
                    continue
                call.add(reply)
                if call.done:
                    del self._calls[reply.call_id]
            self._routed.notify_all()
        for on_note, note in notes:  # outside the lock: a listener may be slow
            on_note(note)

    def _pump(self, limit: float | None) -> None:
        """Read the transport once (at most ``limit`` s) and route what arrived."""
        with self._routed:
            ranks = sorted({rank for call in self._calls.values() for rank in call.waiting_for})
        if not ranks:
            return
        try:
            replies = self.transport.poll(ranks, limit)
        except WorkerDiedError as exc:
            self._fail(exc)
            raise
        self._route(replies)

    def _wait(
        self, calls: Sequence[PendingCall], timeout: float | None, every: bool
    ) -> list[PendingCall]:
        if not calls:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pending = [call for call in calls if not call.done]
            if not pending or (not every and len(pending) < len(calls)):
                return [call for call in calls if call.done]
            if not every and any(call.released for call in pending):
                return []  # a replica is free for its next batch (see ReplicaScheduler.drive)
            now = time.monotonic()
            ends = [call.deadline for call in pending if call.deadline is not None]
            late = [call for call in pending if call.deadline is not None and now >= call.deadline]
            if late:
                error = ExecutorTimeoutError(late[0].name, late[0].timeout, late[0].waiting_for)
                self._fail(error)  # a stuck rank cannot be interrupted: nothing can follow
                raise error
            if deadline is not None:
                if now >= deadline:
                    return [call for call in calls if call.done]
                ends.append(deadline)
            limit = max(
                0.0, min(POLL_SLICE_S, *(end - now for end in ends)) if ends else POLL_SLICE_S
            )
            if self._pump_lock.acquire(blocking=False):
                try:
                    self._pump(limit)
                finally:
                    self._pump_lock.release()
                    with self._routed:
                        self._routed.notify_all()  # another waiter may take over the transport
            else:
                with self._routed:
                    if not any(call.done for call in calls):
                        self._routed.wait(max(0.001, limit))

    def wait_all(
        self, calls: Sequence[PendingCall], timeout: float | None = None
    ) -> list[PendingCall]:
        return self._wait(calls, timeout, every=True)

    def wait(self, calls: Sequence[ReplicaCall], timeout: float | None = None) -> list[ReplicaCall]:
        """The calls that are done, waiting (up to ``timeout``) until at least one is."""
        return self._wait(calls, timeout, every=False)  # type: ignore[arg-type]

    # -- the executor contract ------------------------------------------------------------------
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
            raise ValueError(
                f"unique_reply_rank {unique_reply_rank} is outside 0..{self.world_size - 1}"
            )
        call = self.start_call(
            range(self.world_size), method, args, kwargs, unique_reply_rank, timeout
        )
        return call.result()

    def submit(
        self,
        replica: int,
        method: RpcMethod,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> PendingCall:
        ranks = self.parallel_layout.replica_ranks(replica)
        return self.start_call(ranks, method, args, kwargs, ranks[0], timeout, replica=replica)

    supports_progress = True

    def signal_replica(self, replica: int, payload: dict[str, Any]) -> bool:
        if self.is_closed or self.is_failed:
            return False
        leader = self.parallel_layout.replica_ranks(replica)[0]
        with self._send_lock:
            return self.transport.signal(
                leader, RpcRequest(MessageKind.SIGNAL, 0, None, (payload,))
            )

    def execute_model(self, requests: list[OmniDiffusionRequest]) -> DiffusionOutput | None:
        """Generate ``requests`` on the first replica (the engine spreads work over all)."""
        return self.submit(
            0, "generate", (list(requests),), timeout=self.od_config.generate_timeout
        ).result()

    def start_workers(self, args: tuple, timeout: float | None) -> None:
        """Send START to every rank and wait until all have loaded. After the first failure
        the others get a short grace to report theirs; ranks still loading after that may
        wait forever for a failed one (e.g. in a group rendezvous), so the executor fails."""
        call = self.start_call(
            range(self.world_size), None, args, timeout=timeout, kind=MessageKind.START
        )
        self.wait_all([call])
        if call.waiting_for and call.error is None:
            call.stop_at_failure = False
            with self._routed:
                self._calls[call.call_id] = call
            self.wait_all([call], timeout=LOAD_GRACE_S)
        if call.error is not None:
            raise call.error
        failures = [reply.failure for reply in call.replies.values() if reply.failure is not None]
        if failures:
            error = WorkerError(call.name, failures)
            if call.waiting_for:
                self._fail(error)
            raise error

    def stop_workers(self, timeout: float) -> bool:
        """SHUTDOWN to every rank; True when each acknowledged in time."""
        try:
            call = self.start_call(
                range(self.world_size), None, timeout=None, kind=MessageKind.SHUTDOWN
            )
            self._wait([call], timeout, every=True)
        except Exception:  # noqa: BLE001 - a rank that cannot be told is dealt with by the caller
            return False
        return call.done and call.error is None
