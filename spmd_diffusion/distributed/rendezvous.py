"""Where the ranks of a tensor/CFG-parallel job meet to build their torch.distributed group.

Only needed where no default group exists (MPI launches and the ``mp`` executor; torchrun
brings its own). The store holds nothing but torch's own rendezvous keys -- no work, no
results, nothing that is unpickled -- and it is opened only when replicas span several ranks.

- One node: a :class:`torch.distributed.FileStore` in a private temporary directory
  (mode 0700). Nothing listens on any network interface (a TCPStore binds every
  interface, whatever host name it is given).
- Several nodes: a TCPStore on rank 0 (port ``MASTER_PORT + 1`` when set, else a free one),
  with every key under a random 128-bit prefix that rank 0 draws and sends over the
  launcher's channel: a stranger who connects cannot name, read or overwrite any key the
  job uses. Its address: ``MASTER_ADDR`` when set (or the one an executor that knows it,
  such as Ray's node IP, passes), else every non-loopback address of rank 0's node -- never
  its host name, which other nodes may not resolve (short names) or which may resolve to
  127.0.1.1 on rank 0's own node. Each rank takes the first address it can reach, tells gloo
  the interface of that route (:mod:`~spmd_diffusion.distributed.netif`), and a rank that
  can reach none fails within :data:`REACH_TIMEOUT_S`, naming the addresses.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import datetime
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.distributed import netif

STORE_TIMEOUT = datetime.timedelta(minutes=30)
REACH_TIMEOUT_S = 10.0  # rank 0's store listens before START is sent: this only covers slow links
PROBE_TIMEOUT_S = 2.0


def reach(
    hosts: tuple[str, ...], port: int, rank: int, timeout: float = REACH_TIMEOUT_S
) -> tuple[str, str]:
    """``(host, local address)`` of the first of ``hosts`` that accepts a connection on
    ``port``; a ConnectionError naming every address after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    errors: dict[str, str] = {}
    while True:
        for host in hosts:
            try:
                with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as probe:
                    return host, probe.getsockname()[0]
            except OSError as exc:
                errors[host] = exc.strerror or str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            tried = ", ".join(f"{host}:{port} ({why})" for host, why in errors.items())
            raise ConnectionError(
                f"rank {rank} cannot reach rank 0's rendezvous store at {tried or 'no address'}; "
                "set MASTER_ADDR to an address of rank 0's node that every node can reach "
                "(and GLOO_SOCKET_IFNAME to the interface that carries it)"
            )
        time.sleep(0.5)


@dataclass(frozen=True)
class Rendezvous:
    """How a worker reaches the job's store: a file on this node, or rank 0's TCP store."""

    world_size: int
    path: str | None = None
    hosts: tuple[str, ...] = ()
    port: int | None = None
    prefix: str = ""

    def connect(self, rank: int) -> Any:
        """The store for ``rank`` (rank 0's TCP server is already open: this is a client).
        Across nodes, gloo is pointed at the interface that reached rank 0."""
        import torch.distributed as dist

        if self.path is not None:
            return dist.FileStore(self.path, self.world_size)
        host, local_address = reach(self.hosts, self.port, rank)
        netif.use_interface_for_gloo(local_address)
        store = dist.TCPStore(host, self.port, None, False, timeout=STORE_TIMEOUT)
        return dist.PrefixStore(self.prefix, store)


class RendezvousServer:
    """Rank 0's side: owns the store (or its directory) for the life of the executor."""

    def __init__(self, world_size: int, one_node: bool, host: str | None = None) -> None:
        self._directory: str | None = None
        self._store: Any = None
        if one_node:
            self._directory = tempfile.mkdtemp(prefix="spmd-diffusion-rendezvous-")
            self.rendezvous = Rendezvous(world_size, path=str(Path(self._directory) / "store"))
            return
        from torch.distributed import TCPStore

        base_port = envs.master_port()
        port = base_port + 1 if base_port else 0
        self._store = TCPStore(
            "0.0.0.0", port, None, True, timeout=STORE_TIMEOUT, wait_for_workers=False
        )
        hosts = (host,) if host else store_addresses()
        self.rendezvous = Rendezvous(
            world_size, hosts=hosts, port=self._store.port, prefix=secrets.token_hex(16)
        )

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
        self._store = None


def store_addresses() -> tuple[str, ...]:
    """Where the other nodes may reach rank 0: ``MASTER_ADDR`` if set, else every
    non-loopback address of this node (its host name's first)."""
    if envs.master_addr():
        return (envs.master_addr(),)
    addresses = tuple(netif.node_addresses())
    if not addresses:
        raise ConnectionError(
            "this multi-node job's rank 0 has no non-loopback IPv4 address to offer the other "
            "nodes; set MASTER_ADDR to an address of rank 0's node that every node can reach"
        )
    return addresses
