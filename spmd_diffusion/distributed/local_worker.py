"""A worker on a thread of the engine's own process (rank 0 of an SPMD job, the uni executor).

The worker thread runs the same :func:`~.serve_loop.run_worker_rank` as every other rank,
over a pair of queues. So rank 0 denoises its share while its main thread keeps scheduling
the other replicas and keeping the books, and the worker is only ever touched by its own
thread (CUDA's current device is per thread, so it is set once, there).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from spmd_diffusion.distributed.protocol import RpcReply, RpcRequest
from spmd_diffusion.distributed.serve_loop import WorkerPlacement, run_worker_rank
from spmd_diffusion.errors import WorkerDiedError

_DEAD = object()  # put on the reply queue when the thread ends without being shut down


class _QueueEndpoint:
    def __init__(self, requests: queue.SimpleQueue, replies: queue.SimpleQueue) -> None:
        self.requests, self.replies = requests, replies

    def recv(self) -> RpcRequest:
        return self.requests.get()

    def send(self, reply: RpcReply) -> None:
        self.replies.put(reply)


class LocalWorker:
    """Rank ``placement.rank``'s worker, served on a daemon thread."""

    def __init__(self, placement: WorkerPlacement, name: str = "spmd-diffusion-worker") -> None:
        self.rank = placement.rank
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        endpoint = _QueueEndpoint(self.requests, self.replies)
        self.thread = threading.Thread(target=self._main, args=(endpoint, placement), name=name, daemon=True)
        self.thread.start()

    def _main(self, endpoint: _QueueEndpoint, placement: WorkerPlacement) -> None:
        try:
            self.exit_code = run_worker_rank(endpoint, placement)
        except BaseException as exc:  # noqa: BLE001 - e.g. SystemExit inside a call: report it
            self.error = exc
            self.replies.put(_DEAD)

    def _died(self) -> WorkerDiedError:
        error = WorkerDiedError(self.rank, None, None)
        error.__cause__ = self.error  # e.g. the SystemExit that ended the thread
        return error

    def send(self, request: RpcRequest) -> None:
        if self.error is not None:
            raise self._died()
        self.requests.put(request)

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
