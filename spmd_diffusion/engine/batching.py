"""Fixed chunks of the request list: the engine's unit of work for a replica.

The chunks depend on the request list alone, never on how many replicas run them or
which of them a resumed run still needs: that is what keeps batch composition, and so
every pixel, the same across layouts. (How a worker splits one chunk into pipeline calls
is :mod:`spmd_diffusion.worker.batching`.)
"""

from __future__ import annotations

from typing import Any

from spmd_diffusion.request import OmniDiffusionRequest


def chunk_requests(requests: list[OmniDiffusionRequest], max_images: int) -> list[list[OmniDiffusionRequest]]:
    """Fixed chunks of compatible requests, in list order, of at most ``max_images`` images
    (a request with more images than that is a chunk of its own)."""
    groups: dict[tuple[Any, ...], list[list[OmniDiffusionRequest]]] = {}
    for request in requests:
        chunks = groups.setdefault(request.batch_key(), [[]])
        current = chunks[-1]
        images = sum(r.num_images_per_prompt for r in current)
        if current and images + request.num_images_per_prompt > max_images:
            chunks.append(current := [])
        current.append(request)
    return [chunk for chunks in groups.values() for chunk in chunks if chunk]
