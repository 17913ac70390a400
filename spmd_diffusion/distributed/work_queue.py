"""Streams of batches over replicas: a shared work counter and a mailbox for outputs.

Replicas pull the next batch of a stream as soon as they are free.

It lives in a torch ``TCPStore`` served by rank 0. The store's server runs on its own C++
thread, so replicas take work even while rank 0 is busy denoising, and the cost is one
``add`` (~150 us) per batch. This is what keeps every replica busy when batches differ in
cost: nobody hands out work in advance.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
from typing import Any

STORE_TIMEOUT = datetime.timedelta(hours=6)


def store_host(local_size: int, size: int) -> str:
    """Where the other ranks reach rank 0's store: MASTER_ADDR if set, loopback on one
    node, else this host's name."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    if local_size == size:
        return "127.0.0.1"
    return socket.getfqdn()


def serve_store() -> tuple[Any, int]:
    """Rank 0: start a TCPStore on a free port (or MASTER_PORT + 1 if the user fixed ports)."""
    from torch.distributed import TCPStore

    port = int(os.environ["MASTER_PORT"]) + 1 if os.environ.get("MASTER_PORT") else 0
    store = TCPStore("0.0.0.0", port, None, True, timeout=STORE_TIMEOUT, wait_for_workers=False)
    return store, store.port


def connect_store(host: str, port: int) -> Any:
    from torch.distributed import TCPStore

    return TCPStore(host, port, None, False, timeout=STORE_TIMEOUT)


class WorkQueue:
    """Batches 0..n-1 of stream ``name``: ``take()`` hands each out exactly once.

    Members of a multi-rank replica do not take work themselves: their leader ``announce``s
    what it took and they ``follow``.
    """

    def __init__(self, store: Any, name: str, total: int) -> None:
        self.store, self.name, self.total = store, name, total

    def take(self) -> int | None:
        """The next batch index, or None when all are taken (or the stream was stopped)."""
        if self.store.check([f"{self.name}/stop"]):
            return None
        index = self.store.add(f"{self.name}/next", 1) - 1
        return index if index < self.total else None

    def stop(self) -> None:
        """Hand out nothing more (e.g. --fail-fast after an error)."""
        self.store.set(f"{self.name}/stop", "1")

    def announce(self, replica: int, step: int, index: int | None) -> None:
        self.store.set(f"{self.name}/r{replica}/{step}", "-1" if index is None else str(index))

    def follow(self, replica: int, step: int) -> int | None:
        index = int(self.store.get(f"{self.name}/r{replica}/{step}"))
        return None if index < 0 else index


class ResultMailbox:
    """Outputs of stream ``name`` on their way to rank 0, held by the store.

    A sender's ``post`` returns as soon as rank 0's store thread has the bytes, so replicas
    never wait for rank 0 (which may be busy denoising its own batch), and no transport has
    to be driven by both sides. Rank 0 reads results in arrival order and deletes them.
    Each sender's last post is ``final``; rank 0 is done when every sender has sent it.
    """

    def __init__(self, store: Any, name: str, senders: list[int] | None = None) -> None:
        self.store, self.name = store, name
        self.waiting_for = set(senders or ())
        self.next_index = 0

    def _key(self, index: int) -> str:
        return f"{self.name}/result/{index}"

    def post(self, sender: int, obj: Any, final: bool = False) -> None:
        index = self.store.add(f"{self.name}/results", 1) - 1
        self.store.set(self._key(index), pickle.dumps((sender, final, obj), protocol=pickle.HIGHEST_PROTOCOL))

    def poll(self) -> list[tuple[int, Any]]:
        """Rank 0: every result that has arrived, in order, without waiting."""
        arrived = []
        while self.store.check([self._key(self.next_index)]):
            key = self._key(self.next_index)
            sender, final, obj = pickle.loads(self.store.get(key))
            self.store.delete_key(key)
            self.next_index += 1
            if final:
                self.waiting_for.discard(sender)
            else:
                arrived.append((sender, obj))
        return arrived

    @property
    def done(self) -> bool:
        return not self.waiting_for
