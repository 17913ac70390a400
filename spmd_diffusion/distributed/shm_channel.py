"""ShmChannel: a process pipe whose large messages travel through shared memory.

Small control messages (RPC tuples, acks) go through the pipe; anything at or above
``threshold`` bytes (batches of images) is written once into a POSIX shared-memory segment
and only its name crosses the pipe. The receiver copies it out and unlinks it. The pipe
end can be waited on together with process sentinels, which is how a dead peer is noticed.
Processes started by ``multiprocessing`` share one resource tracker, so a segment created
on one side and unlinked on the other is accounted for exactly once.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

INLINE = b"I"
SHARED = b"S"
DEFAULT_THRESHOLD = 1 << 20


class ShmChannel:
    def __init__(self, conn: Connection, threshold: int = DEFAULT_THRESHOLD) -> None:
        self.conn = conn
        self.threshold = threshold

    def fileno(self) -> int:
        return self.conn.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) < self.threshold:
            self.conn.send_bytes(INLINE + data)
            return
        segment = SharedMemory(create=True, size=len(data))
        try:
            segment.buf[: len(data)] = data
            self.conn.send_bytes(SHARED + f"{segment.name}:{len(data)}".encode())
        except BaseException:
            segment.unlink()
            raise
        finally:
            segment.close()

    def recv(self) -> Any:
        raw = self.conn.recv_bytes()
        kind, body = raw[:1], raw[1:]
        if kind == INLINE:
            return pickle.loads(body)
        name, _, size = body.decode().rpartition(":")
        segment = SharedMemory(name=name)
        try:
            data = bytes(segment.buf[: int(size)])
        finally:
            segment.close()
            segment.unlink()
        return pickle.loads(data)

    def close(self) -> None:
        self.conn.close()
