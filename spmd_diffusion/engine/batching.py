"""Fixed chunks of the request list: the engine's unit of work for a replica.

The chunks are cut by the one packing rule (:class:`~spmd_diffusion.utils.packing.Packer`),
in images, per batch shape. They depend on the request list alone, never on how many
replicas run them or which of them a resumed run still needs: that is what keeps batch
composition, and so every pixel, the same across layouts. (How a worker splits one chunk
into pipeline calls is :mod:`spmd_diffusion.worker.batching`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.packing import Packer, pack

T = TypeVar("T")


def _images(request: OmniDiffusionRequest) -> int:
    return request.num_images_per_prompt


def chunk_requests(
    requests: list[OmniDiffusionRequest], max_images: int
) -> list[list[OmniDiffusionRequest]]:
    """Fixed chunks of compatible requests, in list order, of at most ``max_images`` images
    (a request with more images than that is a chunk of its own)."""
    return pack(requests, max_images, OmniDiffusionRequest.batch_key, _images)


def iter_chunks(
    entries: Iterable[T],
    max_images: int,
    request_of: Callable[[T], OmniDiffusionRequest] = lambda entry: entry,
) -> Iterator[list[T]]:
    """The chunks of :func:`chunk_requests`, read from a stream: the same chunks (the same
    requests together), emitted as each closes instead of grouped by shape.
    ``request_of`` finds the request in an entry (entries may carry more)."""
    packer: Packer[T] = Packer(max_images)
    for entry in entries:
        request = request_of(entry)
        yield from packer.add(request.batch_key(), request.num_images_per_prompt, entry)
    for _, chunk in packer.close():
        yield chunk
