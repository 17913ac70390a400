"""Which images of one call can share one pipeline call.

The unit is one image (a request with ``num_images_per_prompt=k`` gives k images, each with
its own seed), so a batch is capped in images, which is what memory scales with. The cut is
the one packing rule (:class:`~spmd_diffusion.utils.packing.Packer`) over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.packing import pack


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
    images = [
        ((request.batch_key(), None if keys is None else keys[pos]), ImageJob(pos, index, seed))
        for pos, request in enumerate(requests)
        if keys is None or keys[pos] is not False
        for index, seed in enumerate(request.image_seeds())
    ]
    batches = pack(images, max_images, key_of=lambda image: image[0], size_of=lambda _: 1)
    return [[job for _, job in batch] for batch in batches]
