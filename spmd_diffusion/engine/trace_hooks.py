"""A JSON-lines trace of the engine's events (``--trace FILE``), one object per line.

Each line has ``event`` and ``t`` (seconds since the trace opened) plus the event's fields;
``denoising_step`` lines are written only with ``steps=True`` (a million-image job makes
tens of millions of steps). Lines are buffered and flushed at least every second, so a
trace costs no synchronous write per event.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from spmd_diffusion.engine.hooks import BatchInfo, EngineHooks

FLUSH_EVERY_S = 1.0


class TraceHooks(EngineHooks):
    def __init__(self, path: str | Path, steps: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._origin = time.monotonic()
        self._flushed = self._origin
        self.steps = steps

    def _write(self, event: str, at: float | None = None, **fields: Any) -> None:
        now = time.monotonic()
        line = json.dumps(
            {
                "event": event,
                "t": round((at if at is not None else now) - self._origin, 6),
                **fields,
            },
            allow_nan=False,
        )
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line + "\n")
            if now - self._flushed >= FLUSH_EVERY_S:
                self._file.flush()
                self._flushed = now

    def request_queued(self, request_id: str, images: int, at: float) -> None:
        self._write("request_queued", at, request_id=request_id, images=images)

    def batch_started(self, batch: BatchInfo) -> None:
        self._write(
            "batch_started",
            batch.started_at,
            batch_id=batch.batch_id,
            replica=batch.replica,
            request_ids=list(batch.request_ids),
            images=batch.images,
        )

    def denoising_step(self, batch: BatchInfo, step: int, seconds: float) -> None:
        if self.steps:
            self._write(
                "denoising_step", batch_id=batch.batch_id, step=step, seconds=round(seconds, 6)
            )

    def batch_finished(self, batch: BatchInfo, seconds: float, failed: int) -> None:
        self._write(
            "batch_finished",
            batch_id=batch.batch_id,
            replica=batch.replica,
            seconds=round(seconds, 6),
            failed=failed,
        )

    def request_done(self, request_id: str, images: int, queue_s: float, latency_s: float) -> None:
        self._write(
            "request_done",
            request_id=request_id,
            images=images,
            queue_s=round(queue_s, 6),
            latency_s=round(latency_s, 6),
        )

    def request_failed(self, request_id: str, error: str, latency_s: float) -> None:
        self._write(
            "request_failed", request_id=request_id, error=error, latency_s=round(latency_s, 6)
        )

    def request_cancelled(self, request_id: str, latency_s: float) -> None:
        self._write("request_cancelled", request_id=request_id, latency_s=round(latency_s, 6))

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
