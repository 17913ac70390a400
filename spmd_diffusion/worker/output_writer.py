"""The replica leader's output writer: a batch's files are written while the next batch runs.

Without it the leader encoded and wrote a batch's images (tens of milliseconds per 512x512
PNG, hundreds per 1024x1024 one) before starting the next batch, with the device idle
meanwhile. Now ``generate`` hands the output and its sink to this thread and returns
at once (the engine is told the replica is free: ``OutputsPending``); the thread writes the
files (each durable before its record leaves: the sink's atomic writes) and then answers the
batch's call with the records, exactly the answer the call would have given. A failure in
the sink fails that batch's call alone.

Bounded: one batch waits while another is written; a third blocks ``submit`` (so the next
batch starts only once the writer has room), which keeps memory flat when the disk is
slower than the device. Pillow's encoders and zlib release the GIL, so the writer costs the
denoising thread little but the Python around them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

QUEUE_DEPTH = 1  # batches waiting for the writer beside the one it writes
CLOSE_TIMEOUT_S = 120.0  # a shutdown waits this long for the files still being written


class OutputWriter:
    """One thread writing (sink, output) jobs in order, each answered by its own callback."""

    def __init__(self, depth: int = QUEUE_DEPTH) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(
            target=self._run, name="spmd-diffusion-output-writer", daemon=True
        )
        self._thread.start()

    def submit(self, sink: Any, output: Any, answer: Callable[..., None]) -> None:
        """Queue one batch (blocks while the writer is a batch behind: back-pressure)."""
        self._jobs.put((sink, output, answer))

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted batch is written and answered (False at the timeout:
        e.g. an answer that cannot leave because the engine is gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._jobs.all_tasks_done:
            while self._jobs.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._jobs.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finish what was submitted (within ``timeout``), then stop the thread."""
        if self.drain(timeout):
            self._jobs.put(None)
            self._thread.join(timeout=timeout)
        else:
            logger.warning("the output writer did not finish within %.0f s; leaving it", timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            sink, output, answer = job
            try:
                try:
                    written = sink.write(output)
                except Exception as exc:  # noqa: BLE001 - that batch's call fails, the writer goes on
                    logger.warning("writing a batch's outputs failed: %s", exc)
                    answer(error=exc)
                else:
                    answer(written)
            except Exception:  # noqa: BLE001 - the channel is gone: the job is ending anyway
                logger.exception("could not answer a written batch")
            finally:
                self._jobs.task_done()
