"""One job per output directory: a lock that rank 0 holds from planning to exit.

Two jobs writing one directory would each make every image, interleave the manifest and
overwrite each other's run.json. So rank 0 takes an exclusive POSIX record lock
(``fcntl.lockf``) on ``OUTPUT/.lock`` before it reads the manifest, and a second job is
refused at once (exit 2) with the first one's host, pid and start time, which the holder
writes into the file. The kernel drops the lock when its process ends, however it ends, so a
lock left by a dead job (killed, node lost) is simply taken over by the next one.

Limits: POSIX locks reach across NFS (v3 through the lock manager, v4 natively) and Lustre
(mounted with ``flock`` or ``localflock``; ``localflock`` only locks within one node); a
filesystem without lock support makes the lock a no-op on that filesystem, not an error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from spmd_diffusion.errors import InputError

LOCK_NAME = ".lock"
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputLock:
    """Held while the object lives (``close()`` releases it; so does the process's end)."""

    def __init__(self, handle: IO[str] | None, path: Path) -> None:
        self.handle, self.path = handle, path

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        return f"host {record['host']}, pid {record['pid']}, started {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a job that has not written its details yet"


def lock_output(output_dir: Path) -> OutputLock:
    """Take ``output_dir``'s job lock, or raise InputError naming the job that holds it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole job
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            handle.close()
            raise InputError(
                f"--output {str(output_dir)!r} is in use by another job ({_holder(path)}); "
                "wait for it to end or give another --output"
            ) from None
        if exc.errno in UNSUPPORTED:
            return OutputLock(handle, path)  # no locks on this filesystem: nothing to enforce
        handle.close()
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        + "\n"
    )
    handle.flush()
    return OutputLock(handle, path)
