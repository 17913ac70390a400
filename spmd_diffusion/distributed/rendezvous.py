"""Where the ranks of a tensor/CFG-parallel job meet to build their torch.distributed group.

Only needed where no default group exists (MPI launches and the ``mp`` executor; torchrun
brings its own). The store holds nothing but torch's own rendezvous keys -- no work, no
results, nothing that is unpickled -- and it is opened only when replicas span several ranks.

- One node: a :class:`torch.distributed.FileStore` in a private temporary directory
  (mode 0700). Nothing listens on any network interface (a TCPStore binds every
  interface, whatever host name it is given).
- Several nodes: a TCPStore on rank 0 (``MASTER_ADDR``/``MASTER_PORT + 1`` when set, else
  this host's name and a free port; an executor that knows the address its workers
  reach, such as Ray's node IP, passes it), with every key under a random 128-bit prefix that rank
  0 draws and sends over the launcher's channel: a stranger who connects cannot name, read
  or overwrite any key the job uses.
"""

from __future__ import annotations

import datetime
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmd_diffusion import envs

STORE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Rendezvous:
    """How a worker reaches the job's store: a file on this node, or rank 0's TCP store."""

    world_size: int
    path: str | None = None
    host: str | None = None
    port: int | None = None
    prefix: str = ""

    def connect(self, rank: int) -> Any:
        """The store for ``rank`` (rank 0's TCP server is already open: this is a client)."""
        import torch.distributed as dist

        if self.path is not None:
            return dist.FileStore(self.path, self.world_size)
        store = dist.TCPStore(self.host, self.port, None, False, timeout=STORE_TIMEOUT)
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
        self._store = TCPStore("0.0.0.0", port, None, True, timeout=STORE_TIMEOUT, wait_for_workers=False)
        host = host or envs.master_addr() or socket.getfqdn()
        self.rendezvous = Rendezvous(world_size, host=host, port=self._store.port, prefix=secrets.token_hex(16))

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
        self._store = None
