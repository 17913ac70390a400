"""Routing and batching policies: which work a free replica gets next.

A policy answers two questions, one per way work arrives:

- ``order(batches)``: a batch job knows all its batches up front (fixed chunks of the item
  list, so pixels never depend on the order); the policy orders them.
- ``select(waiting, max_images, max_wait_s, now)``: a server's requests arrive one by one;
  the policy picks the requests of the next batch from those waiting (all of one shape,
  ``OmniDiffusionRequest.batch_key``), or says when to look again.

Built in (``--schedule``): ``fifo`` (arrival order, nothing overtakes; a batch job's
batches as the plan lists them), ``shape`` (a shape's batches together; a server gathers the
oldest request's shape from the whole queue; the default), ``cost`` (longest
first: cost = steps x pixels x images, so a mixed batch job does not end with one replica
finishing a long batch alone while the others idle). Your own: a dotted path to a class
with these two methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.imports import import_by_path

# Stand-ins where a request leaves a setting to the pipeline's default: only the ratio
# between requests matters, and requests that leave it alike compare alike.
DEFAULT_STEPS_FOR_COST = 50
DEFAULT_SIDE_FOR_COST = 512


def request_cost(request: OmniDiffusionRequest) -> float:
    """Denoiser work of a request, in step-pixels: steps x height x width x images."""
    steps = request.num_inference_steps or DEFAULT_STEPS_FOR_COST
    height = request.height or DEFAULT_SIDE_FOR_COST
    width = request.width or DEFAULT_SIDE_FOR_COST
    return float(steps) * height * width * request.num_images_per_prompt


class Queued(Protocol):
    """What a policy sees of a waiting request."""

    request: OmniDiffusionRequest
    queued_at: float


@dataclass
class Selection:
    """The requests to start now, or (empty) the time to look again (None: nothing waits)."""

    batch: list[Any] = field(default_factory=list)
    wake_at: float | None = None


class SchedulePolicy(Protocol):
    def order(self, batches: Sequence[Sequence[OmniDiffusionRequest]]) -> list[int]:
        """Indices of ``batches`` in the order they are handed out."""

    def select(
        self, waiting: Sequence[Queued], max_images: int, max_wait_s: float, now: float
    ) -> Selection:
        """The next batch from ``waiting`` (oldest first)."""


def gather(
    candidates: Sequence[Queued], max_images: int, contiguous: bool = False
) -> tuple[list[Queued], int]:
    """Requests of the first candidate's shape, in order, up to ``max_images`` images (a
    request bigger than that goes alone). ``contiguous`` stops at the first other shape."""
    key = candidates[0].request.batch_key()
    batch: list[Queued] = []
    images = 0
    for item in candidates:
        if item.request.batch_key() != key:
            if contiguous:
                break
            continue
        if batch and images + item.request.num_images_per_prompt > max_images:
            break
        batch.append(item)
        images += item.request.num_images_per_prompt
    return batch, images


def hold_or_start(
    batch: list[Queued], images: int, max_images: int, max_wait_s: float, now: float
) -> Selection:
    """A batch that is not full waits for company until its oldest request has waited
    ``max_wait_s``: a few milliseconds of latency buy fuller batches."""
    deadline = min(item.queued_at for item in batch) + max_wait_s
    if images < max_images and now < deadline:
        return Selection(wake_at=deadline)
    return Selection(batch=batch)


class ShapePolicy:
    """The oldest request's shape, gathered from the whole queue (what the engine did first)."""

    name = "shape"

    def order(self, batches: Sequence[Sequence[OmniDiffusionRequest]]) -> list[int]:
        """Every batch of the first shape, then the next shape's, ... (stable)."""
        rank: dict[tuple[Any, ...], int] = {}
        for batch in batches:
            rank.setdefault(batch[0].batch_key(), len(rank))
        return sorted(range(len(batches)), key=lambda index: rank[batches[index][0].batch_key()])

    def select(
        self, waiting: Sequence[Queued], max_images: int, max_wait_s: float, now: float
    ) -> Selection:
        if not waiting:
            return Selection()
        batch, images = gather(waiting, max_images)
        return hold_or_start(batch, images, max_images, max_wait_s, now)


class FifoPolicy:
    """Strict arrival order: a batch is the oldest request and the same-shape requests right
    behind it; a batch job's batches run in the order listed (its plan lists a shape's fixed
    chunks together, so there fifo and shape agree)."""

    name = "fifo"

    def order(self, batches: Sequence[Sequence[OmniDiffusionRequest]]) -> list[int]:
        return list(range(len(batches)))

    def select(
        self, waiting: Sequence[Queued], max_images: int, max_wait_s: float, now: float
    ) -> Selection:
        if not waiting:
            return Selection()
        batch, images = gather(waiting, max_images, contiguous=True)
        if len(batch) < len(waiting):
            return Selection(batch=batch)  # another shape waits behind: do not hold it up
        return hold_or_start(batch, images, max_images, max_wait_s, now)


class CostAwarePolicy:
    """Longest first. For a batch job: batches by cost, descending (ties keep their order),
    so the long ones start while short ones remain to fill the gaps at the end. For a
    server: of the shapes whose oldest request is ready, the costliest waiting group."""

    name = "cost"

    def order(self, batches: Sequence[Sequence[OmniDiffusionRequest]]) -> list[int]:
        costs = [sum(request_cost(request) for request in batch) for batch in batches]
        return sorted(range(len(batches)), key=lambda index: -costs[index])

    def select(
        self, waiting: Sequence[Queued], max_images: int, max_wait_s: float, now: float
    ) -> Selection:
        if not waiting:
            return Selection()
        groups: dict[tuple[Any, ...], list[Queued]] = {}
        for item in waiting:
            groups.setdefault(item.request.batch_key(), []).append(item)
        best: Selection | None = None
        best_cost = -1.0
        wake_at: float | None = None
        for members in groups.values():
            batch, images = gather(members, max_images)
            selection = hold_or_start(batch, images, max_images, max_wait_s, now)
            if not selection.batch:
                wake_at = (
                    selection.wake_at
                    if wake_at is None
                    else min(wake_at, selection.wake_at or wake_at)
                )
                continue
            cost = sum(request_cost(item.request) for item in batch)
            if cost > best_cost:
                best, best_cost = selection, cost
        return best or Selection(wake_at=wake_at)


POLICIES: dict[str, type] = {"fifo": FifoPolicy, "shape": ShapePolicy, "cost": CostAwarePolicy}


def resolve_policy(spec: str | SchedulePolicy | None) -> SchedulePolicy:
    """A policy from its name (fifo, shape, cost), a dotted path to a class, or an instance."""
    if spec is None:
        return ShapePolicy()
    if not isinstance(spec, str):
        return spec
    if spec in POLICIES:
        return POLICIES[spec]()
    if "." not in spec and ":" not in spec:
        raise ValueError(
            f"unknown schedule {spec!r}: choose {', '.join(POLICIES)} or a dotted path to a class"
        )
    try:
        target = import_by_path(spec)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load schedule {spec!r}: {exc}") from None
    policy = target() if isinstance(target, type) else target
    missing = [
        method for method in ("order", "select") if not callable(getattr(policy, method, None))
    ]
    if missing:
        raise ValueError(f"schedule {spec!r} lacks {', '.join(missing)}()")
    return policy
