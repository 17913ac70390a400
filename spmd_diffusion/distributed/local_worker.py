"""A worker on a thread of the engine's own process (rank 0 of an SPMD job, the uni executor).

The worker thread runs the same :func:`~.serve_loop.run_worker_rank` as every other rank,
over a pair of queues. So rank 0 denoises its share of a batch job on that thread while its
main thread keeps scheduling the other replicas and keeping the books.

A collective call with no timeout may instead run on the caller's own thread
(:meth:`LocalWorker.run_inline`) when the worker is idle and nothing is queued before it:
the same order, without a thread hand-off: two thread wake-ups and a contended GIL per call
made a no-op ``collective_rpc`` several times dearer (benchmarks/RESULTS.md, "Measurements
behind design choices").
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from spmd_diffusion.distributed.protocol import RpcReply, RpcRequest, answer
from spmd_diffusion.distributed.serve_loop import WorkerPlacement, run_worker_rank
from spmd_diffusion.errors import WorkerDiedError

_DEAD = object()  # put on the reply queue when the thread ends without being shut down


class LocalWorker:
    """Rank ``placement.rank``'s worker, served on a daemon thread.

    ``_busy`` is held while a request runs (on the thread or inline); ``_queued`` counts
    requests handed over and not yet answered, so an inline call never overtakes one."""

    def __init__(self, placement: WorkerPlacement, name: str = "spmd-diffusion-worker") -> None:
        self.rank = placement.rank
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.signals: queue.SimpleQueue = queue.SimpleQueue()  # read between a running call's steps
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self.worker: Any = None
        self._state = threading.Lock()
        self._busy = threading.Lock()
        self._queued = 0
        self.thread = threading.Thread(target=self._main, args=(placement,), name=name, daemon=True)
        self.thread.start()

    # -- the worker thread's end of the queues -------------------------------------------------
    def recv(self) -> RpcRequest:
        request = self.requests.get()
        self._busy.acquire()
        return request

    def send(self, reply: RpcReply) -> None:
        self.replies.put(reply)
        with self._state:
            self._queued -= 1
        self._busy.release()

    def notify(self, reply: RpcReply) -> None:
        """A reply outside the serve loop's own: a running call's note, or the answer of a
        call the output writer finishes."""
        self.replies.put(reply)

    def finish_deferred(self) -> None:
        """The call just served will be answered by the output writer: the worker thread is
        free for the next request now."""
        with self._state:
            self._queued -= 1
        self._busy.release()

    def poll_request(self) -> RpcRequest | None:
        try:
            return self.signals.get_nowait()
        except queue.Empty:
            return None

    def _main(self, placement: WorkerPlacement) -> None:
        try:
            self.exit_code = run_worker_rank(self, placement, loaded=self._loaded)
        except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit inside a call: report it
            self.error = exc
            self.replies.put(_DEAD)

    def _loaded(self, worker: Any) -> None:
        self.worker = worker

    # -- the engine's end ----------------------------------------------------------------------
    def _died(self) -> WorkerDiedError:
        error = WorkerDiedError(self.rank, None, None)
        error.__cause__ = self.error  # e.g. the SystemExit that ended the thread
        return error

    def signal(self, request: RpcRequest) -> None:
        """Hand a SIGNAL to the running call (read between its steps; never answered)."""
        self.signals.put(request)

    def submit(self, request: RpcRequest) -> None:
        """Queue ``request`` for the worker thread."""
        if self.error is not None:
            raise self._died()
        with self._state:
            self._queued += 1
        self.requests.put(request)

    def run_inline(self, request: RpcRequest) -> RpcReply | None:
        """Answer ``request`` on this thread if the worker is idle with nothing queued;
        None when it must be queued instead."""
        if self.worker is None or self.error is not None:
            return None
        with self._state:
            if self._queued or not self._busy.acquire(blocking=False):
                return None
        try:
            return answer(self.worker, self.rank, request)
        finally:
            self._busy.release()

    def _drain(self, first: Any) -> list[RpcReply]:
        items = [first]
        while True:
            try:
                items.append(self.replies.get_nowait())
            except queue.Empty:
                break
        if any(item is _DEAD for item in items):
            raise self._died()
        return items

    def poll(self) -> list[RpcReply]:
        """Replies that are ready, without waiting."""
        try:
            first = self.replies.get_nowait()
        except queue.Empty:
            return []
        return self._drain(first)

    def wait(self, timeout: float | None) -> list[RpcReply]:
        """Replies, waiting up to ``timeout`` for the first."""
        try:
            first = self.replies.get(timeout=timeout)
        except queue.Empty:
            return []
        return self._drain(first)

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()
