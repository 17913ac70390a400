"""How long a batch may run before its replica counts as stuck.

A rank that stops answering (SIGSTOP, a hung collective, a GPU that fell off the bus) would
otherwise hold rank 0 for the whole ``generate_timeout`` (an hour). So each batch gets its
own deadline, learned from the batches already done: the slowest seconds per image-step seen
so far times the batch's image-steps, times a generous ``factor``, never under ``floor``. A
replica's first batch (model warm-up, ``torch.compile``, allocator growth) has no such bound
below ``generate_timeout``. ``batch_timeout`` fixes the deadline of every later batch instead.
A batch past its deadline ends the job (``ExecutorTimeoutError`` naming the ranks that did not
answer: exit 1, run.json ``failed``); a rerun resumes as after a kill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FACTOR = 10.0
FLOOR_S = 120.0
DEFAULT_STEPS = 50  # diffusers' usual default, until an output says what the pipeline used


class BatchWatchdog:
    """Per-batch deadlines for the replica scheduler (see the module docstring)."""

    def __init__(
        self,
        batch_timeout: float | None,
        generate_timeout: float | None,
        factor: float = FACTOR,
        floor: float = FLOOR_S,
    ) -> None:
        self.fixed, self.cap, self.factor, self.floor = (
            batch_timeout,
            generate_timeout,
            factor,
            floor,
        )
        self.warm_pace: float | None = None  # the slowest seconds per image-step of warm batches
        self.first_pace: float | None = (
            None  # the same of replicas' first batches (warm-up included)
        )
        self.default_steps = DEFAULT_STEPS
        self.warm: set[int] = set()  # replicas past their first batch

    def _units(self, requests: Sequence[Any]) -> int:
        return (
            sum(
                request.num_images_per_prompt * (request.num_inference_steps or self.default_steps)
                for request in requests
            )
            or 1
        )

    def timeout_for(self, replica: int, requests: Sequence[Any]) -> float | None:
        """Seconds the batch may take on ``replica`` (None: no limit)."""
        pace = self.warm_pace if self.warm_pace is not None else self.first_pace
        if replica not in self.warm or (self.fixed is None and pace is None):
            return self.cap
        if self.fixed is not None:
            limit = self.fixed
        else:
            limit = max(self.floor, self.factor * pace * self._units(requests))
        return limit if self.cap is None else min(limit, self.cap)

    def denoised(self, replica: int) -> None:
        """``replica`` finished denoising a batch (its files are still being written): its
        warm-up is over, so its next batch is timed even before this one is answered."""
        self.warm.add(replica)

    def observe(self, replica: int, requests: Sequence[Any], output: Any, seconds: float) -> None:
        """A finished batch: its replica is warm, and its pace (if slower) is the new bound."""
        first = replica not in self.warm
        self.warm.add(replica)
        steps = [
            meta.get("num_inference_steps") for meta in (getattr(output, "metadata", None) or [])
        ]
        steps = [value for value in steps if isinstance(value, int)]
        if steps and all(request.num_inference_steps is None for request in requests):
            self.default_steps = max(steps)
        pace = seconds / self._units(requests)
        if first:
            self.first_pace = pace if self.first_pace is None else max(self.first_pace, pace)
        else:
            self.warm_pace = pace if self.warm_pace is None else max(self.warm_pace, pace)
