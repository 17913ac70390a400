"""AsyncDiffusionEngine: many concurrent callers, one dispatcher, dynamic batching.

``await engine.generate(request)`` may be called by any number of coroutines at once. A
dispatcher thread runs the engine's replica scheduler (the same loop a batch job uses) with
this engine's queue as its work source: the schedule policy batches requests that share a
shape (``batch_key``: size, steps, guidance, extra arguments), up to ``max_images_per_batch``
images, waiting at most ``max_wait_s`` for company, and each batch goes to whichever
replica is free. Results are handed back to each caller's event loop.

Cancelling a caller's task drops its request if it has not started. A started one is
signalled to its replica, which stops the pipeline call at the next step boundary once every
request in that call is cancelled (see ``worker/step_watch.py``): the replica is free for the
next batch, and requests batched with it are not harmed (their call runs on; the cancelled
request's images are dropped). While a batch runs its replica reports step progress a few
times a second: ``generate_events`` yields it as ``step`` events, and hooks see
``batch_progress``.

Batching changes the last bits of an image (a batch of 4 against 4 of 1 differ by ~2e-6,
which can flip a pixel level): set ``batch_invariant`` on the config where a request must
give the same bytes whatever it was batched with.
"""

# ruff: noqa: PLC0415 - project modules load where used (engine.prometheus_hooks): they pull in
# heavy modules or import back into this one

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import RpcMethod
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.engine.hooks import BatchInfo, EngineHooks, HookList
from spmd_diffusion.engine.policies import SchedulePolicy, resolve_policy
from spmd_diffusion.engine.scheduler import ReplicaScheduler, Work
from spmd_diffusion.errors import ExecutorClosedError
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

DEFAULT_PROGRESS_INTERVAL_S = 0.25  # a few small messages per second per replica


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
    replica: int | None = None  # where its batch runs, once started

    def tell(self, event: dict[str, Any]) -> None:
        """Hand a progress event to the caller's loop (if it asked for events)."""
        if self.events is not None:
            self._on_loop(self.events.put_nowait, event)

    def _on_loop(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` on the caller's loop; a caller whose loop has closed meanwhile (it
        left) is simply not told: that must never stop the dispatcher."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def resolve(
        self, output: DiffusionOutput | None = None, error: BaseException | None = None
    ) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(output)

        if not self.cancelled:
            self.tell(
                {
                    "event": "done" if error is None else "failed",
                    "request_id": self.request.request_id,
                }
            )
        self._on_loop(settle)


class _CallerEvents(EngineHooks):
    """Tells each caller that asked for events when its batch started, and where."""

    def __init__(self, engine: AsyncDiffusionEngine) -> None:
        self.engine = engine

    def batch_started(self, batch: BatchInfo) -> None:
        for request_id in batch.request_ids:
            item = self.engine._started.get(request_id)
            if item is not None:
                item.replica = batch.replica
                item.tell(
                    {
                        "event": "started",
                        "request_id": request_id,
                        "replica": batch.replica,
                        "batch_size": len(batch.request_ids),
                        "batch_id": batch.batch_id,
                    }
                )

    def batch_progress(
        self, batch: BatchInfo, request_ids: tuple[str, ...], step: int, steps: int
    ) -> None:
        for request_id in request_ids:
            item = self.engine._started.get(request_id)
            if item is not None:
                item.tell({"event": "step", "request_id": request_id, "step": step, "steps": steps})


class AsyncDiffusionEngine:
    """The asyncio front of a :class:`DiffusionEngine` (which it owns)."""

    def __init__(
        self,
        od_config: OmniDiffusionConfig,
        max_wait_s: float | None = None,
        policy: SchedulePolicy | str | None = None,
        hooks: list[EngineHooks] | None = None,
        engine: DiffusionEngine | None = None,
        progress_interval_s: float | None = DEFAULT_PROGRESS_INTERVAL_S,
    ) -> None:
        """``max_wait_s`` (default: the config's ``batch_wait_s``) is how long a partial batch
        waits for company. ``engine``: serve an engine you already have (it is not closed by
        :meth:`close` then); else one is built from ``od_config`` and owned.
        ``progress_interval_s``: how often a running batch reports its step (None: never, and
        a started request cannot be stopped)."""
        max_wait_s = od_config.batch_wait_s if max_wait_s is None else max_wait_s
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.owns_engine = engine is None
        self.engine = engine if engine is not None else DiffusionEngine(od_config, hooks=hooks)
        self.od_config = od_config
        self.max_wait_s = max_wait_s
        self.policy = resolve_policy(policy or od_config.batch_policy)
        self.hooks = HookList(
            [*self.engine.hooks.hooks, *(hooks if engine is not None and hooks else [])]
        )
        self._queue: list[Waiting] = []
        self._started: dict[str, Waiting] = {}
        self._changed = threading.Condition()
        self._generation = 0
        self._seen_generation = 0
        self._closing = False
        self.failure: BaseException | None = None
        self.signals_sent = 0  # cancellations handed to running batches
        self.progress_interval_s = progress_interval_s
        events = HookList([self.hooks, _CallerEvents(self)])
        self.scheduler = ReplicaScheduler(self.engine.executor, self.policy, events)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="spmd-diffusion-dispatcher", daemon=True
        )
        self._dispatcher.start()

    @property
    def executor(self) -> Any:
        return self.engine.executor

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def may_grow(self) -> bool:
        """More requests may still come (the scheduler's work source contract)."""
        return not self._closing

    def add_hook(self, hook: EngineHooks) -> None:
        """Watch this engine's events with ``hook`` from now on (the scheduler calls
        ``self.hooks`` too)."""
        self.hooks.add(hook)

    def metrics_hooks(self) -> Any:
        """The Prometheus hooks watching this engine (added if none is)."""
        from spmd_diffusion.engine.prometheus_hooks import PrometheusHooks

        found = next((hook for hook in self.hooks.hooks if isinstance(hook, PrometheusHooks)), None)
        if found is None:
            found = PrometheusHooks()
            self.add_hook(found)
        return found

    @property
    def queued(self) -> int:
        """Requests waiting for a replica."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in batches that replicas are running."""
        return len(self._started)

    # -- callers -----------------------------------------------------------------------------
    def _enqueue(
        self, request: OmniDiffusionRequest, events: asyncio.Queue | None = None
    ) -> Waiting:
        (prepared,) = self.engine.prepare([request])
        loop = asyncio.get_running_loop()
        item = Waiting(prepared, loop.create_future(), loop, time.monotonic(), events=events)
        with self._changed:
            if self._closing or self.failure is not None:
                raise ExecutorClosedError(
                    f"the engine is {'failed: ' + str(self.failure) if self.failure else 'closed'}"
                )
            if prepared.request_id in self._started or any(
                w.request.request_id == prepared.request_id for w in self._queue
            ):
                raise ValueError(
                    f"duplicate request_id {prepared.request_id!r}: "
                    "a request with this id is running"
                )
            self._queue.append(item)
            self._generation += 1
            self._changed.notify_all()
        if self.hooks:
            self.hooks.request_queued(
                prepared.request_id, prepared.num_images_per_prompt, item.queued_at
            )
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
        its replica and batch size), ``step`` (``step`` of ``steps``, a few times a second), then
        ``done`` with the output (or ``failed`` with the error). Leaving the loop early cancels
        the request, started or not."""
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
            dropped = not item.started and item in self._queue
            if dropped:
                self._queue.remove(item)
            running = item.started and self._started.get(item.request.request_id) is item
        if dropped:
            self.hooks.request_cancelled(item.request.request_id, time.monotonic() - item.queued_at)
        elif running and item.replica is not None and self.progress_interval_s is not None:
            try:
                if self.engine.executor.signal_replica(
                    item.replica, {"cancel": [item.request.request_id]}
                ):
                    self.signals_sent += 1
            except Exception as exc:  # noqa: BLE001 - the batch then runs to its end, as before
                logger.warning(
                    "could not signal replica %d to stop %s: %s",
                    item.replica,
                    item.request.request_id,
                    exc,
                )

    async def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        return await asyncio.to_thread(
            self.engine.collective_rpc, method, timeout, args, kwargs, unique_reply_rank
        )

    async def check_health(self) -> None:
        await asyncio.to_thread(self.engine.check_health)

    # -- the scheduler's work source ------------------------------------------------------------
    def take(self, now: float) -> Work | float | None:
        with self._changed:
            self._seen_generation = self._generation
            selection = self.policy.select(
                self._queue, self.od_config.max_images_per_batch, self.max_wait_s, now
            )
            if not selection.batch:
                return selection.wake_at
            for item in selection.batch:
                item.started = True
                self._queue.remove(item)
                self._started[item.request.request_id] = item
        kwargs = None
        if self.progress_interval_s is not None and self.engine.executor.supports_progress:
            kwargs = {"progress": {"interval_s": self.progress_interval_s}}
        return Work(
            [item.request for item in selection.batch],
            [item.queued_at for item in selection.batch],
            kwargs,
        )

    def wait_for_work(self, until: float | None) -> None:
        with self._changed:
            while self._generation == self._seen_generation and not self._closing:
                pause = None if until is None else until - time.monotonic()
                if pause is not None and pause <= 0:
                    return
                self._changed.wait(pause)

    def finished(self, work: Work, output: DiffusionOutput) -> None:
        by_id = {single.request_id: single for single in output.split()}
        with self._changed:
            started = [self._started.pop(request.request_id, None) for request in work.requests]
        for item in filter(None, started):
            single = by_id.get(item.request.request_id)
            item.resolve(
                single or DiffusionOutput.failed([item.request.request_id], "no output returned")
            )

    def _dispatch(self) -> None:
        try:
            self.scheduler.drive(self, timeout=self.od_config.generate_timeout)
        except BaseException as exc:  # noqa: BLE001 - an executor that failed fails every caller
            logger.error("the engine stopped: %s", exc)
            with self._changed:
                self.failure = exc
                stranded = list(self._started.values()) + self._queue
                self._queue, self._started = [], {}
            for item in stranded:
                item.resolve(error=exc)

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
            self.hooks.request_cancelled(item.request.request_id, time.monotonic() - item.queued_at)
            item.resolve(error=ExecutorClosedError("the engine closed before this request started"))
        self._dispatcher.join()
        if self.owns_engine:
            self.engine.close()

    async def __aenter__(self) -> AsyncDiffusionEngine:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
