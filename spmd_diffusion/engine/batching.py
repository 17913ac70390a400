"""Which images can share one pipeline call.

The unit is one image (a request with ``num_images_per_prompt=k`` gives k images, each with
its own seed), so a batch is capped in images, which is what memory scales with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from spmd_diffusion.request import OmniDiffusionRequest


@dataclass(frozen=True)
class ImageJob:
    """Image ``index`` of request ``request_pos`` (its position in the call), with its seed."""

    request_pos: int
    index: int
    seed: int


def batch_key(request: OmniDiffusionRequest) -> tuple[Any, ...]:
    """Requests with equal keys can run in one pipeline call (prompts may differ)."""
    extra = json.dumps(request.extra, sort_keys=True, default=repr)
    return (request.num_inference_steps, request.guidance_scale, request.height, request.width, extra)


def plan_batches(requests: list[OmniDiffusionRequest], max_images: int) -> list[list[ImageJob]]:
    """Group the images of compatible requests, in request order, at most ``max_images`` each."""
    groups: dict[tuple[Any, ...], list[ImageJob]] = {}
    for pos, request in enumerate(requests):
        jobs = groups.setdefault(batch_key(request), [])
        for index, seed in enumerate(request.image_seeds()):
            jobs.append(ImageJob(pos, index, seed))
    batches = []
    for jobs in groups.values():
        batches.extend(jobs[i : i + max_images] for i in range(0, len(jobs), max_images))
    return batches


def chunk_requests(requests: list[OmniDiffusionRequest], max_images: int) -> list[list[OmniDiffusionRequest]]:
    """Fixed chunks of compatible requests, in list order, of at most ``max_images`` images
    (a request with more images than that is a chunk of its own).

    The chunks depend on the request list alone, never on how many replicas run them or
    which of them a resumed run still needs: that is what keeps batch composition, and so
    every pixel, the same across layouts.
    """
    groups: dict[tuple[Any, ...], list[list[OmniDiffusionRequest]]] = {}
    for request in requests:
        chunks = groups.setdefault(batch_key(request), [[]])
        current = chunks[-1]
        images = sum(r.num_images_per_prompt for r in current)
        if current and images + request.num_images_per_prompt > max_images:
            chunks.append(current := [])
        current.append(request)
    return [chunk for chunks in groups.values() for chunk in chunks if chunk]
