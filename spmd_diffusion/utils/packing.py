"""The packing rule: how a sequence of items is cut into fixed batches, written once.

The engine packs requests into chunks, its unit of work for a replica
(:mod:`spmd_diffusion.engine.batching`); a batch job's planning pass counts those chunks
without keeping any; a worker packs the images of one chunk into pipeline calls
(:mod:`spmd_diffusion.worker.batching`). All of them cut with :class:`Packer`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Packer(Generic[T]):
    """Items join the open chunk of their key (only items of one key may share a chunk), in
    order; a chunk holds at most ``capacity`` units. An item that does not fit in its key's
    open chunk closes it and opens the next; a chunk that is full closes at once (an item of
    more than ``capacity`` units is a chunk of its own). Only the open chunks are held, one
    per key, so a stream of any length packs as it is read; adding no item counts chunks
    without keeping anything (:attr:`chunks`)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.open: dict[Hashable, tuple[list[T], int]] = {}
        self.closed = 0

    def add(self, key: Hashable, size: int, item: T | None = None) -> list[list[T]]:
        """Pack ``item`` (of ``size`` units); the chunks this closes (none, one or two)."""
        chunk, units = self.open.get(key, ([], 0))
        closed = []
        if units and units + size > self.capacity:
            closed.append(chunk)
            chunk, units = [], 0
        if item is not None:
            chunk.append(item)
        units += size
        if units >= self.capacity:  # full: nothing more can join it
            self.open.pop(key, None)
            closed.append(chunk)
        else:
            self.open[key] = (chunk, units)
        self.closed += len(closed)
        return closed

    def close(self) -> list[tuple[Hashable, list[T]]]:
        """Close every open chunk; each with its key, in the order they were opened."""
        chunks = [(key, chunk) for key, (chunk, _) in self.open.items()]
        self.open.clear()
        self.closed += len(chunks)
        return chunks

    @property
    def chunks(self) -> int:
        """Chunks cut so far, the open ones included."""
        return self.closed + len(self.open)


def pack(
    items: Iterable[T], capacity: int, key_of: Callable[[T], Hashable], size_of: Callable[[T], int]
) -> list[list[T]]:
    """Every chunk of ``items``, grouped by key (keys in the order first seen), each key's
    chunks in item order."""
    packer: Packer[T] = Packer(capacity)
    by_key: dict[Hashable, list[list[T]]] = {}
    for item in items:
        key = key_of(item)
        by_key.setdefault(key, []).extend(packer.add(key, size_of(item), item))
    for key, chunk in packer.close():
        by_key[key].append(chunk)
    return [chunk for chunks in by_key.values() for chunk in chunks]
