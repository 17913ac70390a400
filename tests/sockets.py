"""The listening TCP sockets of a set of processes, read from /proc as ``ss -ltnp`` does
(no iproute2 needed): which address each one is bound to, and which processes hold it."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"


def _listening() -> dict[str, tuple[str, int]]:
    """``{socket inode: (address, port)}`` of every listening TCP socket on the machine."""
    found = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found[fields[9]] = (str(ipaddress.ip_address(raw)), int(port, 16))
    return found


def _holders() -> dict[str, set[int]]:
    """``{socket inode: pids holding it}`` over every process this user can see."""
    held: dict[str, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    held.setdefault(target[8:-1], set()).add(int(entry.name))
        except OSError:
            continue  # gone, or not ours
    return held


def own_listening_sockets(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of the sockets only ``pids`` hold: their own, not one inherited from
    a launcher that still holds it too."""
    listening, holders = _listening(), _holders()
    return sorted(
        listening[inode]
        for inode, owners in holders.items()
        if inode in listening and owners <= pids
    )


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
