"""Logging where every line names its rank.

Rank 0 logs at INFO; other ranks at WARNING unless ``SPMD_DIFFUSION_LOG_LEVEL`` says
otherwise, so an 8-rank job does not print everything eight times.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (tqdm)

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from spmd_diffusion import envs

FORMAT = "[rank %(rank)s] %(asctime)s %(levelname)s %(name)s: %(message)s"
# Import-time warnings printed by every rank of every job about nothing the job uses:
# torchao's prebuilt CUDA kernels that cannot load on this machine, torch's notice about the
# enums torchao registers, diffusers' note that it cannot import torchao's tensor types for old
# checkpoints, transformers' fallback to PIL image processors without torchvision (the
# pipelines' feature extractors). Errors still show; -v shows everything.
QUIET_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
    "transformers.utils.import_utils",
)


# Libraries whose log lines may quote a whole prompt (diffusers' "The following part of your
# input was truncated because CLIP can only handle sequences up to 77 tokens: ..." quotes all
# of it, every batch, on every rank): their lines are cut to this many characters.
QUOTING_LIBRARIES = ("diffusers", "transformers")
MAX_LIBRARY_LINE = 400


def _clipped_records(make: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.name.split(".", 1)[0] in QUOTING_LIBRARIES:
            message = record.getMessage()
            if len(message) > MAX_LIBRARY_LINE:
                record.msg, record.args = (
                    (
                        f"{message[:MAX_LIBRARY_LINE]}... "
                        f"({len(message) - MAX_LIBRARY_LINE} characters more)"
                    ),
                    None,
                )
        return record

    make_record._spmd_diffusion = True  # type: ignore[attr-defined]
    return make_record


def clip_library_lines() -> None:
    """Cut long log lines of :data:`QUOTING_LIBRARIES` (idempotent)."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "_spmd_diffusion", False):
        logging.setLogRecordFactory(_clipped_records(current))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def thread_lock_for_progress_bars() -> None:
    """tqdm's bars (ours and diffusers') share a thread lock instead of the multiprocessing
    semaphore tqdm makes by default: a process that leaves with ``os._exit`` (Ctrl-C, a lost
    rank) left that semaphore to multiprocessing's resource tracker, which then printed
    "There appear to be 2 leaked semaphore objects". No bar is shared across processes."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def setup_logging(rank: int, level: str | None = None) -> None:
    """Configure the ``spmd_diffusion`` logger for this rank (idempotent)."""
    level = level or envs.log_level() or ("INFO" if rank == 0 else "WARNING")
    logger = logging.getLogger("spmd_diffusion")
    for handler in list(logger.handlers):
        if getattr(handler, "_spmd_diffusion", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._spmd_diffusion = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    clip_library_lines()
    thread_lock_for_progress_bars()
    if level.upper() != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
