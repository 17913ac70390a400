"""Fixed chunks of the request list: the engine's unit of work for a replica.

The chunks depend on the request list alone, never on how many replicas run them or
which of them a resumed run still needs: that is what keeps batch composition, and so
every pixel, the same across layouts. (How a worker splits one chunk into pipeline calls
is :mod:`spmd_diffusion.worker.batching`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from spmd_diffusion.request import OmniDiffusionRequest

T = TypeVar("T")


def chunk_requests(
    requests: list[OmniDiffusionRequest], max_images: int
) -> list[list[OmniDiffusionRequest]]:
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


def iter_chunks(
    entries: Iterable[T],
    max_images: int,
    request_of: Callable[[T], OmniDiffusionRequest] = lambda entry: entry,
) -> Iterator[list[T]]:
    """The chunks of :func:`chunk_requests`, read from a stream: the same chunks (the same
    requests together), emitted as each fills instead of grouped by shape, holding one open
    chunk per shape. ``request_of`` finds the request in an entry (entries may carry more)."""
    open_chunks: dict[tuple[Any, ...], tuple[list[T], int]] = {}
    for entry in entries:
        request = request_of(entry)
        key = request.batch_key()
        chunk, images = open_chunks.get(key, ([], 0))
        if chunk and images + request.num_images_per_prompt > max_images:
            yield chunk
            chunk, images = [], 0
        chunk.append(entry)
        images += request.num_images_per_prompt
        if images >= max_images:  # full: nothing more can join it
            open_chunks.pop(key, None)
            yield chunk
        else:
            open_chunks[key] = (chunk, images)
    for chunk, _ in open_chunks.values():
        yield chunk


class ChunkCounter:
    """How many chunks :func:`iter_chunks` would cut, counted from (shape, images) alone:
    a million-item plan without listing anything (the same packing rule, one open count per
    shape)."""

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.open: dict[tuple[Any, ...], int] = {}
        self.closed = 0

    def add(self, key: tuple[Any, ...], images: int) -> None:
        current = self.open.get(key, 0)
        if current and current + images > self.max_images:
            self.closed += 1
            current = 0
        current += images
        if current >= self.max_images:
            self.closed += 1
            current = 0
        self.open[key] = current

    @property
    def chunks(self) -> int:
        return self.closed + sum(1 for images in self.open.values() if images)
