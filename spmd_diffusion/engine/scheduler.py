"""The replica scheduler: free replica <- next batch, for every executor and every front end.

It lives in the engine, above the executors, which only move messages. One loop serves
both ways work arrives, each a :class:`WorkSource`: a batch job's batches
(:class:`BatchSource`: a fixed list ordered by the schedule policy, or a stream pulled a
window at a time as replicas free up, so a job of millions of items never lists them) and a
server's queue of requests that keep arriving (the async engine, batched by the policy as
they come). Each free replica gets the next
batch; outputs are collected in whatever order replicas finish. Nobody hands out work in
advance, so replicas stay busy even when batches differ in cost.

A batch that fails inside the worker (a WorkerError) becomes a failed output for its
requests and the others go on; an executor that can go on no more (a rank died, a call
timed out) raises out of :meth:`ReplicaScheduler.drive` after the outputs that did arrive
were delivered. Monitoring hooks are called here, so every front end reports alike.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.engine.hooks import BatchInfo, HookList
from spmd_diffusion.engine.policies import SchedulePolicy, resolve_policy
from spmd_diffusion.engine.watchdog import BatchWatchdog
from spmd_diffusion.errors import CANCELLED, WorkerError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor, ReplicaCall
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

Batch = list[OmniDiffusionRequest]

# While some replica is free and more work may arrive, the loop looks at the queue at least
# this often (the executors' wait cannot be woken by a new request): a new request starts
# within this. While every replica is busy it simply waits for one to finish.
FREE_SLICE_S = 0.005


@dataclass(eq=False)
class Work:
    """A batch ready to start: its requests, when each entered the engine, its extra call
    arguments, and its number in the order its source handed batches out (a batch list's
    index; a source's own key for what it keeps of the batch)."""

    requests: Batch
    queued_at: list[float]
    kwargs: dict[str, Any] | None = None
    index: int = 0


OnResult = Callable[[Work, DiffusionOutput], Any]  # (the batch, its output)


class WorkSource(Protocol):
    """Where the scheduler's batches come from."""

    may_grow: bool  # more work may still arrive (a server); False for a fixed list

    def take(self, now: float) -> Work | float | None:
        """The batch to start now; else when to look again (a float), or None."""

    def wait_for_work(self, until: float | None) -> None:
        """Block until work may have arrived, or ``until`` (only called while ``may_grow``)."""

    def finished(self, work: Work, output: DiffusionOutput) -> bool | None:
        """``work``'s output; return False to stop handing out new batches."""


def failed_output(batch: Batch, error: str, rank: int | None = None) -> DiffusionOutput:
    return DiffusionOutput.failed([request.request_id for request in batch], error, rank)


def images_of(output: DiffusionOutput, position: int) -> int:
    """Images a request got (written ones count too: a sink leaves records in metadata)."""
    return len(output.images[position]) or len(
        output.metadata[position].get("files", ()) if output.metadata else ()
    )


# A stream is read ahead this many batches, or this many images (whichever comes first), and
# each window ordered by the policy: enough to group shapes, small enough that rank 0 holds
# little (every request read ahead is held until its output arrives).
STREAM_WINDOW = 64
STREAM_WINDOW_IMAGES = 4096


class BatchSource:
    """A batch job's fixed batches, from a list or an iterator, read ``window`` batches (at
    most ``STREAM_WINDOW_IMAGES`` images) ahead; each window is ordered by the policy and
    handed out, then the next is read, so rank 0 holds a window and the running batches,
    never the whole job. ``window=None`` reads everything at once: a list ordered as a whole.
    ``kwargs_for(work)`` gives a batch's extra call arguments (e.g. its output sink);
    ``on_result(work, output)`` takes its output."""

    may_grow = False

    def __init__(
        self,
        batches: Iterable[Batch],
        policy: SchedulePolicy,
        on_result: OnResult,
        kwargs_for: Callable[[Work], dict[str, Any] | None] | None = None,
        hooks: HookList | None = None,
        window: int | None = STREAM_WINDOW,
    ) -> None:
        self.batches = iter(batches)
        self.policy = policy
        self.on_result = on_result
        self.kwargs_for = kwargs_for
        self.hooks = hooks
        self.window = window
        self.read = 0  # batches read so far: the next one's index
        self.ready: deque[tuple[int, Batch, float]] = deque()

    def _read_window(self) -> None:
        window: list[Batch] = []
        if self.window is None:
            window = list(self.batches)
        else:
            images = 0
            for batch in islice(self.batches, self.window):
                window.append(batch)
                images += sum(request.num_images_per_prompt for request in batch)
                if images >= STREAM_WINDOW_IMAGES:
                    break
        now = time.monotonic()
        if self.hooks:
            for batch in window:
                for request in batch:
                    self.hooks.request_queued(
                        request.request_id, request.num_images_per_prompt, now
                    )
        first, self.read = self.read, self.read + len(window)
        self.ready.extend((first + i, window[i], now) for i in self.policy.order(window))

    def take(self, now: float) -> Work | None:
        if not self.ready:
            self._read_window()
            if not self.ready:
                return None
        index, batch, queued_at = self.ready.popleft()
        work = Work(batch, [queued_at] * len(batch), index=index)
        if self.kwargs_for is not None:
            work.kwargs = self.kwargs_for(work)
        return work

    def wait_for_work(self, until: float | None) -> None:
        raise RuntimeError("a batch job's batches never grow")

    def finished(self, work: Work, output: DiffusionOutput) -> bool | None:
        return self.on_result(work, output)


@dataclass
class Running:
    work: Work
    info: BatchInfo
    freed: bool = False  # its replica took the next batch while this one's files are written


class ReplicaScheduler:
    """Runs batches over every replica of ``executor``."""

    def __init__(
        self,
        executor: DiffusionExecutor,
        policy: SchedulePolicy | str | None = None,
        hooks: HookList | None = None,
        watchdog: BatchWatchdog | None = None,
    ) -> None:
        self.executor = executor
        self.policy = resolve_policy(policy)
        self.hooks = hooks if hooks is not None else HookList()
        self.watchdog = (
            watchdog  # per-batch deadlines (a stuck replica ends the job), else ``timeout``
        )
        self._batch_ids = 0

    def _output(self, call: ReplicaCall, batch: Batch) -> DiffusionOutput:
        """The replica's output, or a failed one for every request of its batch."""
        try:
            output = call.result()
        except WorkerError as error:
            logger.warning("batch on replica %d failed: %s", call.replica, error.brief())
            return failed_output(batch, error.brief(), error.ranks[0] if error.ranks else None)
        if not isinstance(output, DiffusionOutput):
            return failed_output(
                batch, f"replica {call.replica} returned {type(output).__name__}, not an output"
            )
        return output

    def run(
        self,
        batches: Iterable[Batch],
        on_result: OnResult,
        kwargs_for: Callable[[Work], dict[str, Any] | None] | None = None,
        timeout: float | None = None,
        window: int | None = None,
    ) -> None:
        """Generate every batch, calling ``on_result(work, output)`` as soon as a batch's
        output exists (``work.index``: its position in ``batches``). ``window`` (None: all of
        them, a list ordered as a whole) reads an iterator that many batches ahead (see
        :class:`BatchSource`). ``on_result`` returning False stops handing out new batches
        (those running still finish and are delivered); an exception in it does the same,
        then is raised (a KeyboardInterrupt is raised at once)."""
        self.drive(
            BatchSource(batches, self.policy, on_result, kwargs_for, self.hooks, window), timeout
        )

    def _start(
        self, replica: int, work: Work, timeout: float | None
    ) -> tuple[ReplicaCall, Running]:
        if self.watchdog is not None:
            timeout = self.watchdog.timeout_for(replica, work.requests)
        call = self.executor.submit(replica, "generate", (work.requests,), work.kwargs, timeout)
        self._batch_ids += 1
        info = BatchInfo(
            self._batch_ids,
            replica,
            tuple(r.request_id for r in work.requests),
            sum(r.num_images_per_prompt for r in work.requests),
            time.monotonic(),
            tuple(work.queued_at),
        )
        if self.hooks:
            self.hooks.batch_started(info)
            call.on_note = lambda note: self.hooks.batch_progress(
                info, tuple(note.request_ids), note.step, note.steps
            )
        return call, Running(work, info)

    def _report(self, running: Running, output: DiffusionOutput) -> None:
        if not self.hooks:
            return
        info, now = running.info, time.monotonic()
        for step, seconds in enumerate(output.timings.get("step_s", ()) if output.timings else ()):
            self.hooks.denoising_step(info, step, seconds)
        self.hooks.batch_finished(
            info, now - info.started_at, sum(e is not None for e in output.errors)
        )
        queued = dict(zip(info.request_ids, info.queued_at, strict=True))
        for position, request_id in enumerate(output.request_ids):
            queued_at = queued.get(request_id, info.started_at)
            if output.errors[position] is None:
                self.hooks.request_done(
                    request_id,
                    images_of(output, position),
                    info.started_at - queued_at,
                    now - queued_at,
                )
            elif output.errors[position].startswith(CANCELLED):
                self.hooks.request_cancelled(request_id, now - queued_at)
            else:
                self.hooks.request_failed(request_id, output.errors[position], now - queued_at)

    def drive(self, source: WorkSource, timeout: float | None = None) -> None:
        """Run ``source``'s work until it has none left (and, if it may grow, is closed)."""
        free = deque(range(self.executor.num_replicas))
        running: dict[ReplicaCall, Running] = {}
        stopping = False
        consumer_error: BaseException | None = None
        while True:
            wake_at = None
            while free and not stopping:
                taken = source.take(time.monotonic())
                if not isinstance(taken, Work):
                    wake_at = taken
                    break
                call, entry = self._start(free.popleft(), taken, timeout)
                running[call] = entry
            if running:
                slice_s = None  # every replica busy, or nothing more can come: wait for one
                if free and not stopping and (source.may_grow or wake_at is not None):
                    slice_s = (
                        FREE_SLICE_S
                        if wake_at is None
                        else max(0.0, min(FREE_SLICE_S, wake_at - time.monotonic()))
                    )
                finished = self.executor.wait(list(running), timeout=slice_s)
                for call, entry in running.items():
                    if call.released and not entry.freed and call not in finished:
                        entry.freed = True  # denoised and handed to the writer: the replica is free
                        call.released = (
                            False  # seen: the executor's wait need not return for it again
                        )
                        free.append(call.replica)
                        if self.watchdog is not None:
                            self.watchdog.denoised(call.replica)
                for call in finished:
                    entry = running.pop(call)
                    if not entry.freed:
                        free.append(call.replica)
                    output = self._output(call, entry.work.requests)
                    if self.watchdog is not None:
                        self.watchdog.observe(
                            call.replica,
                            entry.work.requests,
                            output,
                            time.monotonic() - entry.info.started_at,
                        )
                    self._report(entry, output)
                    if consumer_error is not None:
                        continue
                    try:
                        if source.finished(entry.work, output) is False:
                            stopping = True
                    except Exception as exc:  # noqa: BLE001 - the consumer failed: let running batches finish
                        consumer_error, stopping = exc, True
                continue
            if stopping or not source.may_grow:
                break
            source.wait_for_work(wake_at)
        if consumer_error is not None:
            raise consumer_error
