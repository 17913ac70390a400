"""AsyncDiffusionEngine: many concurrent callers, one dispatcher, dynamic batching.

``await engine.generate(request)`` may be called by any number of coroutines at once. A
dispatcher thread owns the replicas: requests that share a shape (``batch_key``: size,
steps, guidance, extra arguments) are batched together, up to ``max_batch_size`` images,
waiting at most ``max_wait_s`` for company, and each batch goes to whichever replica is
free (the same executor interface the batch job's scheduler uses). Results are handed back
to each caller's event loop.

Cancelling a caller's task drops its request if it has not started; a request already in a
running batch finishes with it and its result is discarded.

Batching changes the last bits of an image (a batch of 4 against 4 of 1 differ by ~2e-6,
which can flip a pixel level): set ``batch_invariant`` on the config where a request must
give the same bytes whatever it was batched with.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import RpcMethod
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.errors import ExecutorClosedError, WorkerError
from spmd_diffusion.executor.diffusion_executor import ReplicaCall
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_S = 0.005
IDLE_SLICE_S = 0.1  # how long the dispatcher waits on busy replicas before looking at the queue again
FREE_SLICE_S = 0.005  # the same while a replica is free: a new request starts within this


@dataclass(eq=False)
class Waiting:
    """One caller's request between ``generate`` and its result."""

    request: OmniDiffusionRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float
    cancelled: bool = False
    started: bool = False
    events: asyncio.Queue | None = None

    @property
    def images(self) -> int:
        return self.request.num_images_per_prompt

    def tell(self, event: dict[str, Any]) -> None:
        """Hand a progress event to the caller's loop (if it asked for events)."""
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def resolve(self, output: DiffusionOutput | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(output)

        if not self.cancelled:
            self.tell({"event": "done" if error is None else "failed", "request_id": self.request.request_id})
        self.loop.call_soon_threadsafe(settle)


@dataclass
class BatchPlan:
    """What the dispatcher decided for the queue: a batch to start now, or when to look again."""

    batch: list[Waiting] = field(default_factory=list)
    wake_at: float | None = None


def plan_next_batch(waiting: Sequence[Waiting], max_images: int, max_wait_s: float, now: float) -> BatchPlan:
    """The requests of the oldest request's shape, in arrival order, up to ``max_images``;
    held back (``wake_at``) while the batch is not full and its oldest request has waited
    less than ``max_wait_s``: a few milliseconds of latency buy fuller batches."""
    if not waiting:
        return BatchPlan()
    oldest = waiting[0]
    key = oldest.request.batch_key()
    batch, images = [], 0
    for item in waiting:
        if item.request.batch_key() != key:
            continue
        if batch and images + item.images > max_images:
            break
        batch.append(item)
        images += item.images
    deadline = oldest.queued_at + max_wait_s
    if images < max_images and now < deadline:
        return BatchPlan(wake_at=deadline)
    return BatchPlan(batch=batch)


class AsyncDiffusionEngine:
    """The asyncio front of a :class:`DiffusionEngine` (which it owns)."""

    def __init__(self, od_config: OmniDiffusionConfig, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.engine = DiffusionEngine(od_config)
        self.od_config = od_config
        self.max_wait_s = max_wait_s
        self._queue: list[Waiting] = []
        self._changed = threading.Condition()
        self._closing = False
        self.failure: BaseException | None = None
        self._dispatcher = threading.Thread(target=self._dispatch, name="spmd-diffusion-dispatcher", daemon=True)
        self._dispatcher.start()

    @property
    def executor(self) -> Any:
        return self.engine.executor

    # -- callers -----------------------------------------------------------------------------
    def _enqueue(self, request: OmniDiffusionRequest, events: asyncio.Queue | None = None) -> Waiting:
        (prepared,) = self.engine.prepare([request])
        loop = asyncio.get_running_loop()
        item = Waiting(prepared, loop.create_future(), loop, time.monotonic(), events=events)
        with self._changed:
            if self._closing or self.failure is not None:
                raise ExecutorClosedError(f"the engine is {'failed: ' + str(self.failure) if self.failure else 'closed'}")
            self._queue.append(item)
            self._changed.notify_all()
        item.tell({"event": "queued", "request_id": prepared.request_id})
        return item

    async def generate(self, request: OmniDiffusionRequest) -> DiffusionOutput:
        """The output of ``request`` (batched with whatever else is waiting)."""
        item = self._enqueue(request)
        try:
            return await item.future
        except asyncio.CancelledError:
            self._cancel(item)
            raise

    async def generate_events(self, request: OmniDiffusionRequest) -> AsyncIterator[dict[str, Any]]:
        """``async for event in engine.generate_events(request)``: ``queued``, ``started`` (with
        its replica and batch size), then ``done`` with the output (or ``failed`` with the error)."""
        events: asyncio.Queue = asyncio.Queue()
        item = self._enqueue(request, events)
        try:
            while True:
                event = await events.get()
                if event["event"] in ("done", "failed"):
                    break
                yield event
            try:
                yield {**event, "output": await item.future}
            except Exception as exc:  # noqa: BLE001 - a failure is an event too
                yield {**event, "event": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            if not item.future.done():
                self._cancel(item)

    def _cancel(self, item: Waiting) -> None:
        with self._changed:
            item.cancelled = True
            if not item.started and item in self._queue:
                self._queue.remove(item)

    async def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        return await asyncio.to_thread(self.engine.collective_rpc, method, timeout, args, kwargs, unique_reply_rank)

    async def check_health(self) -> None:
        await asyncio.to_thread(self.engine.check_health)

    # -- the dispatcher ------------------------------------------------------------------------
    def _take_batch(self, now: float) -> BatchPlan:
        with self._changed:
            plan = plan_next_batch(self._queue, self.od_config.max_batch_size, self.max_wait_s, now)
            for item in plan.batch:
                item.started = True
                self._queue.remove(item)
            return plan

    def _deliver(self, call: ReplicaCall, batch: list[Waiting]) -> None:
        try:
            output = call.result()
        except WorkerError as error:
            output = DiffusionOutput.failed([item.request.request_id for item in batch], error.brief())
        if not isinstance(output, DiffusionOutput):
            output = DiffusionOutput.failed([item.request.request_id for item in batch], "no output returned")
        by_id = {single.request_id: single for single in output.split()}
        for item in batch:
            single = by_id.get(item.request.request_id)
            item.resolve(single or DiffusionOutput.failed([item.request.request_id], "no output returned"))

    def _fail_all(self, error: BaseException, running: dict[ReplicaCall, list[Waiting]]) -> None:
        with self._changed:
            self.failure = error
            stranded = [item for batch in running.values() for item in batch] + self._queue
            self._queue = []
        for item in stranded:
            item.resolve(error=error)

    def _dispatch(self) -> None:
        free = deque(range(self.executor.num_replicas))
        running: dict[ReplicaCall, list[Waiting]] = {}
        timeout = self.od_config.generate_timeout
        try:
            while True:
                wake_at = None
                while free:
                    plan = self._take_batch(time.monotonic())
                    if not plan.batch:
                        wake_at = plan.wake_at
                        break
                    replica = free.popleft()
                    call = self.executor.submit(replica, "generate", ([item.request for item in plan.batch],), None,
                                                timeout)
                    running[call] = plan.batch
                    for item in plan.batch:
                        item.tell({"event": "started", "request_id": item.request.request_id, "replica": replica,
                                   "batch_size": len(plan.batch)})
                if running:
                    slice_s = FREE_SLICE_S if free else IDLE_SLICE_S
                    if wake_at is not None:
                        slice_s = max(0.0, min(slice_s, wake_at - time.monotonic()))
                    for call in self.executor.wait(list(running), timeout=slice_s):
                        free.append(call.replica)
                        self._deliver(call, running.pop(call))
                    continue
                with self._changed:
                    if self._closing and not self._queue:
                        return
                    if not self._queue or wake_at is not None:
                        pause = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                        self._changed.wait(pause if pause is not None else IDLE_SLICE_S)
        except BaseException as exc:  # noqa: BLE001 - an executor that failed fails every caller
            logger.error("the dispatcher stopped: %s", exc)
            self._fail_all(exc, running)

    # -- life ------------------------------------------------------------------------------------
    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        """Finish what has started, refuse what waits, then close the engine."""
        with self._changed:
            if self._closing:
                return
            self._closing = True
            refused, self._queue = self._queue, []
            self._changed.notify_all()
        for item in refused:
            item.resolve(error=ExecutorClosedError("the engine closed before this request started"))
        self._dispatcher.join()
        self.engine.close()

    async def __aenter__(self) -> AsyncDiffusionEngine:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
