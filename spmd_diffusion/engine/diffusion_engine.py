"""DiffusionEngine: rank 0's front door. Validates and seeds requests, cuts them into batches
and schedules the batches over the replicas of whichever executor the config names."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import RpcMethod
from spmd_diffusion.engine.batching import chunk_requests
from spmd_diffusion.engine.hooks import EngineHooks, HookList, load_hooks
from spmd_diffusion.engine.policies import SchedulePolicy, resolve_policy
from spmd_diffusion.engine.scheduler import STREAM_WINDOW, ReplicaScheduler, Work
from spmd_diffusion.engine.seeding import with_seed
from spmd_diffusion.engine.watchdog import BatchWatchdog
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.executor.registry import check_executor_for_launch
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

WARM_UP_STEPS = 2  # every kernel of the step loop runs by then; the VAE decode runs once anyway


class DiffusionEngine:
    """``generate(requests)`` returns one DiffusionOutput per request, in request order.

    Seeds are fixed here, once, before any request leaves rank 0; batching and the choice
    of replica happen here too, so every executor behaves alike. ``generate`` and
    ``collective_rpc`` may be called from several threads (the executor routes replies by
    call id).

    ``policy`` (default: the config's ``schedule``) orders the batches; ``hooks`` are
    monitoring hooks called besides those the config names (see :mod:`.hooks`).
    """

    def __init__(
        self,
        od_config: OmniDiffusionConfig,
        policy: SchedulePolicy | str | None = None,
        hooks: list[EngineHooks] | None = None,
    ) -> None:
        self.od_config = od_config
        self.hooks: HookList = load_hooks([*od_config.hooks, *(hooks or [])])
        self.policy = resolve_policy(
            policy or od_config.batch_policy
        )  # bad names fail before workers start
        executor_class = DiffusionExecutor.get_class(od_config)
        check_executor_for_launch(executor_class)
        logger.info("executor: %s", executor_class.__name__)
        self.executor: DiffusionExecutor = executor_class(od_config)
        watchdog = BatchWatchdog(od_config.batch_timeout, od_config.generate_timeout)
        self.scheduler = ReplicaScheduler(self.executor, self.policy, self.hooks, watchdog)

    def prepare(self, requests: Sequence[OmniDiffusionRequest]) -> list[OmniDiffusionRequest]:
        """Check types, unique ids and the config's limits, and fix every seed here, on the
        engine, not on a rank."""
        prepared = []
        seen: set[str] = set()
        for request in requests:
            if not isinstance(request, OmniDiffusionRequest):
                raise TypeError(f"expected OmniDiffusionRequest, got {type(request).__name__}")
            if request.request_id in seen:
                raise ValueError(f"duplicate request_id {request.request_id!r}")
            seen.add(request.request_id)
            self.od_config.check_limits(request)
            prepared.append(with_seed(request, self.od_config.seed))
        return prepared

    def generate(
        self, requests: list[OmniDiffusionRequest] | OmniDiffusionRequest
    ) -> list[DiffusionOutput]:
        """Run every request (spread over all replicas) and return their outputs in order;
        the images travel back to this process because the caller asked for them."""
        if isinstance(requests, OmniDiffusionRequest):
            requests = [requests]
        prepared = self.prepare(list(requests))
        if not prepared:
            return []
        by_id: dict[str, DiffusionOutput] = {}

        def keep(work: Work, output: DiffusionOutput) -> None:
            for single in output.split():
                by_id[single.request_id] = single

        self.scheduler.run(
            chunk_requests(prepared, self.od_config.max_images_per_batch),
            keep,
            timeout=self.od_config.generate_timeout,
        )
        for request in prepared:
            if request.request_id not in by_id:
                by_id[request.request_id] = DiffusionOutput.failed(
                    [request.request_id], "no output returned"
                )
        return [by_id[r.request_id] for r in prepared]

    def generate_stream(
        self,
        batches: Sequence[list[OmniDiffusionRequest]] | Iterable[list[OmniDiffusionRequest]],
        on_output: Callable[[DiffusionOutput], Any],
        sinks: Sequence[Any] | Callable[[list[OmniDiffusionRequest]], Any] | None = None,
    ) -> None:
        """Run fixed batches over all replicas, calling ``on_output`` as each finishes (in
        any order). ``on_output`` may return False to stop handing out new batches.

        ``batches`` is a list, checked and seeded as a whole and ordered as a whole by the
        schedule policy, or any other iterable, read lazily a window at a time as replicas
        free up (a job of millions of items; each batch is checked and seeded as it is read,
        and request ids are checked for repeats within a batch only: the caller vouches for
        the rest).

        ``sinks[i]`` (optional; or ``sinks(batch)``) writes batch i's images where they
        belong and replaces them in the output by small records (see
        :mod:`spmd_diffusion.jobs.outputs`). It runs on the replica's leader when the
        executor's workers share this filesystem (so pixels never travel to rank 0), else
        here, on the output that came back."""
        on_leader = sinks is not None and self.executor.writes_outputs
        window: int | None = STREAM_WINDOW
        if isinstance(batches, Sequence):
            prepared = iter(self.prepare([request for batch in batches for request in batch]))
            batches, window = [[next(prepared) for _ in batch] for batch in batches], None
        else:
            batches = self._prepared(batches)
        written: dict[int, Any] = {}  # batch index -> its sink, while it runs (sinks run here)

        def sink_of(work: Work) -> dict[str, Any] | None:
            if sinks is None:
                return None
            sink = sinks[work.index] if isinstance(sinks, Sequence) else sinks(work.requests)
            if on_leader:
                return {"sink": sink}
            written[work.index] = sink
            return None

        def deliver(work: Work, output: DiffusionOutput) -> Any:
            sink = written.pop(work.index, None)
            return on_output(sink.write(output) if sink is not None else output)

        self.scheduler.run(
            batches, deliver, sink_of, timeout=self.od_config.generate_timeout, window=window
        )

    def _prepared(
        self, batches: Iterable[list[OmniDiffusionRequest]]
    ) -> Iterator[list[OmniDiffusionRequest]]:
        for batch in batches:
            yield self.prepare(batch)

    def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """Run ``method`` on every rank (see :meth:`DiffusionExecutor.collective_rpc`)."""
        return self.executor.collective_rpc(
            method, timeout=timeout, args=args, kwargs=kwargs, unique_reply_rank=unique_reply_rank
        )

    def warm_up(self, requests: Sequence[OmniDiffusionRequest]) -> float | None:
        """Every replica runs a copy of ``requests`` (ids of their own, at most
        ``WARM_UP_STEPS`` steps), images dropped, before the timed work (see
        ``OmniDiffusionConfig.warmup``); the slowest rank's seconds, None where none ran."""
        if self.od_config.warmup is False:
            return None  # asked off: not even a call to the ranks
        copies = [
            dataclasses.replace(
                request,
                request_id=f"warm-up-{request.request_id}",
                num_inference_steps=min(
                    request.num_inference_steps or WARM_UP_STEPS, WARM_UP_STEPS
                ),
            )
            for request in requests
        ]
        seconds = self.collective_rpc(
            "warm_up", timeout=self.od_config.generate_timeout, args=(self.prepare(copies),)
        )
        ran = [value for value in seconds if value is not None]
        return max(ran) if ran else None

    def check_health(self) -> None:
        self.executor.check_health()

    def sleep(self, level: int = 1) -> None:
        self.executor.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.executor.wake_up(tags)

    def close(self) -> None:
        try:
            self.executor.shutdown()
        finally:
            self.hooks.close()

    def __enter__(self) -> DiffusionEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.executor.interrupted = True  # Ctrl-C: stop now, do not wait for running batches
        self.close()
