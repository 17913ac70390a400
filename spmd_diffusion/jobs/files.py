"""Crash-safe file writes: a job killed at any moment leaves no half-written file."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from spmd_diffusion.errors import OutputWriteError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = (
    0o666 & ~_read_umask()
)  # what open() would give: others on a shared cluster can read results


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the new name is in the directory's data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync_directory: bool = True) -> None:
    """Write to a temporary file in the same directory, flush it to disk, then rename it
    over ``path`` (rename is atomic) and sync the directory: readers see the old file or the
    new one, never part, and a crash after this returns keeps the new one. The file gets the
    mode ``open()`` would give (``mkstemp`` makes it private). ``sync_directory=False``: the
    caller syncs the directory once after several files (a batch's images), before it
    vouches for any of them."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".part", dir=path.parent
        )
    except OSError as exc:
        raise OutputWriteError.from_os_error(path, exc) from None
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), FILE_MODE)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        if sync_directory:
            fsync_directory(path.parent)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise OutputWriteError.from_os_error(path, exc) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_state(path: Path, data: bytes) -> None:
    """:func:`write_atomic`, and on a full disk a rewrite in place: the old file's blocks are
    freed by the truncation first, so a job's last word (run.json: failed) still fits where
    a second copy would not."""
    try:
        write_atomic(path, data)
    except OutputWriteError as exc:
        if exc.errno not in NO_SPACE or not path.exists():
            raise
        try:
            with open(path, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError:
            raise exc from None


class AppendLog:
    """An append-only text file written a whole line (or block of lines) per ``write`` call.

    Each block goes out in one ``os.write`` on an ``O_APPEND`` descriptor and is fsynced,
    so lines are never interleaved or half-written by this process; a reader still skips a
    final line without its newline (a crash of the machine itself can leave one).
    """

    def __init__(self, path: Path, truncate: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o666)  # the umask applies, as for any file
        self._terminate_partial_line(path)

    def _terminate_partial_line(self, path: Path) -> None:
        size = path.stat().st_size
        if size:
            with open(path, "rb") as stream:
                stream.seek(size - 1)
                if stream.read(1) != b"\n":
                    os.write(self.fd, b"\n")  # a torn last line stays unparseable, not glued

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, data[written:])
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputWriteError.from_os_error(self.path, exc) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
