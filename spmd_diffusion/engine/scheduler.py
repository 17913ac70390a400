"""The replica scheduler: free replica <- next batch, for every executor.

It lives in the engine, above the executors, which only move messages: it hands the next
batch (as its policy orders them) to whichever data-parallel replica is free, collects the
outputs in whatever order replicas finish, and stops handing out work when told to. Nobody
hands out work in advance, so replicas stay busy even when batches differ in cost.

A batch that fails inside the worker (a WorkerError) becomes a failed output for its
requests and the others go on; an executor that can go on no more (a rank died, a call
timed out) ends the run after the outputs that did arrive were delivered.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.errors import WorkerError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor, ReplicaCall
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

Batch = list[OmniDiffusionRequest]
OnResult = Callable[[int, DiffusionOutput], Any]  # (batch index, its output)


class SchedulePolicy(Protocol):
    """Which pending batch goes to the next free replica."""

    def order(self, batches: Sequence[Batch]) -> list[int]:
        """The batch indices in the order they are handed out."""


class FifoPolicy:
    """Batches in the order given (the batch job's order is its item order)."""

    def order(self, batches: Sequence[Batch]) -> list[int]:
        return list(range(len(batches)))


def failed_output(batch: Batch, error: str, rank: int | None = None) -> DiffusionOutput:
    return DiffusionOutput.failed([request.request_id for request in batch], error, rank)


class ReplicaScheduler:
    """Runs batches over every replica of ``executor``."""

    def __init__(self, executor: DiffusionExecutor, policy: SchedulePolicy | None = None) -> None:
        self.executor = executor
        self.policy = policy or FifoPolicy()

    def _output(self, call: ReplicaCall, batch: Batch) -> DiffusionOutput:
        """The replica's output, or a failed one for every request of its batch."""
        try:
            output = call.result()
        except WorkerError as error:
            logger.warning("batch on replica %d failed: %s", call.replica, error.brief())
            return failed_output(batch, error.brief(), error.ranks[0] if error.ranks else None)
        if not isinstance(output, DiffusionOutput):
            return failed_output(batch, f"replica {call.replica} returned {type(output).__name__}, not an output")
        return output

    def run(
        self,
        batches: Sequence[Batch],
        on_result: OnResult,
        kwargs_for: Callable[[int], dict[str, Any] | None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Generate every batch, calling ``on_result(index, output)`` as soon as batch
        ``index``'s output exists. ``on_result`` returning False stops handing out new batches (those running
        still finish and are delivered); an exception in it does the same, then is raised
        (a KeyboardInterrupt is raised at once)."""
        pending = deque(self.policy.order(batches))
        free = deque(range(self.executor.num_replicas))
        running: dict[ReplicaCall, int] = {}
        stopping = False
        consumer_error: BaseException | None = None
        while running or (pending and not stopping):
            while free and pending and not stopping:
                index = pending.popleft()
                kwargs = kwargs_for(index) if kwargs_for is not None else None
                call = self.executor.submit(free.popleft(), "generate", (batches[index],), kwargs, timeout)
                running[call] = index
            for call in self.executor.wait(list(running)):
                index = running.pop(call)
                free.append(call.replica)
                output = self._output(call, batches[index])
                if consumer_error is not None:
                    continue
                try:
                    if on_result(index, output) is False:
                        stopping = True
                except Exception as exc:  # noqa: BLE001 - the consumer failed: let running batches finish
                    consumer_error, stopping = exc, True
        if consumer_error is not None:
            raise consumer_error
