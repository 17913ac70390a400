"""Typed errors that cross process boundaries.

A failure on any rank reaches the caller as one exception that names the rank(s), the
exception type and the remote traceback text, so nobody has to read N log files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from spmd_diffusion.exit_codes import EXIT_INTERRUPTED, EXIT_TERMINATED


class SpmdDiffusionError(Exception):
    """Base class of every error this package raises on purpose."""


@dataclass(frozen=True)
class RankFailure:
    """What went wrong on one rank, as plain picklable text."""

    rank: int
    exc_type: str
    message: str
    traceback: str

    def summary(self) -> str:
        return f"rank {self.rank}: {self.exc_type}: {self.message}"


class WorkerError(SpmdDiffusionError):
    """A call failed on one or more workers."""

    def __init__(self, method: str, failures: list[RankFailure]) -> None:
        self.method = method
        self.failures = sorted(failures, key=lambda f: f.rank)
        ranks = ", ".join(str(f.rank) for f in self.failures)
        lines = [f"{method!r} failed on rank(s) {ranks}"]
        for failure in self.failures:
            lines.append(f"--- {failure.summary()}")
            if failure.traceback:
                lines.append(failure.traceback.rstrip())
        super().__init__("\n".join(lines))

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.failures]

    def brief(self) -> str:
        """One line per distinct failure, naming its ranks; no tracebacks."""
        by_text: dict[str, list[int]] = {}
        for failure in self.failures:
            by_text.setdefault(f"{failure.exc_type}: {failure.message}", []).append(failure.rank)
        lines = [f"{self.method!r} failed"]
        for text, ranks in by_text.items():
            lines.append(
                f"  rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {text}"
            )
        return "\n".join(lines)

    @property
    def exc_types(self) -> list[str]:
        return [f.exc_type for f in self.failures]

    @property
    def rank_lost(self) -> bool:
        """A rank's peer died under it (see :func:`peer_lost`)."""
        return "ConnectionLostError" in self.exc_types

    def __reduce__(self):  # keep it picklable with its structured fields
        return (type(self), (self.method, self.failures))


class ExecutorTimeoutError(SpmdDiffusionError, TimeoutError):
    """A call did not finish on every rank within its timeout."""

    def __init__(self, method: str, timeout: float, pending_ranks: list[int]) -> None:
        self.method = method
        self.timeout = timeout
        self.pending_ranks = sorted(pending_ranks)
        ranks = ", ".join(map(str, self.pending_ranks)) or "?"
        super().__init__(f"{method!r} did not finish within {timeout:g} s on rank(s) {ranks}")

    def __reduce__(self):
        return (type(self), (self.method, self.timeout, self.pending_ranks))


class WorkerDiedError(SpmdDiffusionError):
    """A worker process ended while the executor still needed it."""

    def __init__(self, rank: int, exitcode: int | None, method: str | None = None) -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.method = method
        during = f" during {method!r}" if method else ""
        super().__init__(f"worker rank {rank} died{during} (exit code {exitcode})")

    def __reduce__(self):
        return (type(self), (self.rank, self.exitcode, self.method))


class ExecutorClosedError(SpmdDiffusionError):
    """The executor was shut down (or failed) and can take no more calls."""


class LaunchError(SpmdDiffusionError):
    """The launcher and the communication library disagree (e.g. srun vs. MPI's PMI)."""


class InputError(SpmdDiffusionError, ValueError):
    """Bad input (a prompt file, an option): reported once, by rank 0, with exit code 2,
    before any model is loaded."""


class OutputWriteError(SpmdDiffusionError, OSError):
    """An output file could not be written (a full disk, a quota, a lost mount): names the
    file and its directory, which the OS error alone does not (``[Errno 28] No space left on
    device``)."""

    def __init__(self, path: str, errno_: int | None, reason: str) -> None:
        self.path, self.errno_, self.reason = path, errno_, reason
        SpmdDiffusionError.__init__(
            self, f"cannot write {path} (in {os.path.dirname(path) or '.'}): {reason}"
        )
        self.errno = errno_

    @classmethod
    def from_os_error(cls, path: object, exc: OSError) -> OutputWriteError:
        return cls(str(path), exc.errno, exc.strerror or str(exc))

    def __reduce__(self):
        return (type(self), (self.path, self.errno_, self.reason))


def gloo_brief(exc: BaseException) -> str:
    """gloo's error without its source path and boilerplate: ``[.../pair.cc:553] Connection
    closed by peer [127.0.0.1]:16011. This is typically caused by...`` becomes ``Connection
    closed by peer [127.0.0.1]:16011``."""
    text = str(exc).strip()
    text = re.sub(r"^\[[^\]]*\.(?:cc|h|cpp):\d+\]\s*", "", text)
    first = re.split(r"\.\s", text, maxsplit=1)[0]
    return first.rstrip(".") or type(exc).__name__


# What gloo (and torch's c10d) say when the peer of a collective or message is gone.
PEER_LOST_TEXT = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Read error [",
)


def peer_lost(exc: BaseException) -> bool:
    """A communication failure because another rank died (not a bug in the request): the
    worker fails the call instead of the request, so the job ends rather than record the
    item as failed."""
    if type(exc).__name__ in ("DistNetworkError", "DistBackendError"):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_LOST_TEXT)


class ConnectionLostError(WorkerDiedError):
    """The launcher's channel to the other ranks broke (one of them died, or closed it)."""

    def __init__(self, detail: str, rank: int | None = None) -> None:
        who = f"rank {rank}" if rank is not None else "a rank"
        SpmdDiffusionError.__init__(
            self, f"lost the connection to {who} ({detail}): it crashed or was killed"
        )
        self.rank, self.exitcode, self.method, self.detail = rank, None, None, detail

    def __reduce__(self):
        return (type(self), (self.detail, self.rank))


class Terminated(KeyboardInterrupt):
    """The job received SIGTERM (Slurm's time limit, scancel, a requeue): it stops the way
    Ctrl-C stops it, so ``run.json`` says why and a rerun resumes."""


def interrupt_exit_code(exc: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


# The error text of a request that was cancelled while it ran starts with this (the engine
# counts it as cancelled, not failed).
CANCELLED = "cancelled"
