"""When this process started, for run.json's start-up time (imports, launch and loading all
happen before the generate phase and were invisible in images/s)."""

from __future__ import annotations

import os
import time

_IMPORTED = time.time()


def process_started() -> float:
    """The process's start as a Unix time: from /proc on Linux (the kernel's own record, so
    the interpreter's start-up and imports count), else when this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: field 22, in clock ticks after boot
        with open("/proc/stat") as boot:
            btime = next(int(line.split()[1]) for line in boot if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED
