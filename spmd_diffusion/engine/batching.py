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
    """Fixed chunks of compatible requests, of at most ``max_images`` images each (a request
    with more images than that is a chunk of its own), listed in the order of their first
    request (a schedule policy may reorder them: that changes when, never what)."""
    open_chunk: dict[tuple[Any, ...], list[OmniDiffusionRequest]] = {}
    chunks: list[list[OmniDiffusionRequest]] = []
    for request in requests:
        key = request.batch_key()
        current = open_chunk.get(key)
        images = sum(r.num_images_per_prompt for r in current) if current else 0
        if current is None or (current and images + request.num_images_per_prompt > max_images):
            current = open_chunk[key] = []
            chunks.append(current)
        current.append(request)
    return chunks
