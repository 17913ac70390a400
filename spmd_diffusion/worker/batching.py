"""Which images of one call can share one pipeline call.

The unit is one image (a request with ``num_images_per_prompt=k`` gives k images, each with
its own seed), so a batch is capped in images, which is what memory scales with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spmd_diffusion.request import OmniDiffusionRequest


@dataclass(frozen=True)
class ImageJob:
    """Image ``index`` of request ``request_pos`` (its position in the call), with its seed."""

    request_pos: int
    index: int
    seed: int


def plan_batches(
    requests: list[OmniDiffusionRequest], max_images: int, keys: list[Any] | None = None
) -> list[list[ImageJob]]:
    """Group the images of compatible requests, in request order, at most ``max_images`` each.

    ``keys[pos]`` (optional) splits further what only the worker knows, e.g. the size an
    input image gives the output: a pipeline call resizes every input to one size, so
    images of different sizes must not share a call. ``keys[pos] is False`` leaves the
    request out (it already failed)."""
    groups: dict[tuple[Any, ...], list[ImageJob]] = {}
    for pos, request in enumerate(requests):
        extra = None if keys is None else keys[pos]
        if extra is False:
            continue
        jobs = groups.setdefault((request.batch_key(), extra), [])
        for index, seed in enumerate(request.image_seeds()):
            jobs.append(ImageJob(pos, index, seed))
    batches = []
    for jobs in groups.values():
        batches.extend(jobs[i : i + max_images] for i in range(0, len(jobs), max_images))
    return batches
