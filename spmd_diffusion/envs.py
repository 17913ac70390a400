"""Every environment variable this package reads (or sets as a default), in one place.

Launchers' own variables (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ``SLURM_*``, torchrun's
``RANK``/``WORLD_SIZE``, ...) are read by
:func:`spmd_diffusion.distributed.launcher.detect_launcher` through :func:`environment`, so
tests can hand it any mapping.

- ``SPMD_DIFFUSION_CACHE``: where the embedded tiny models are built (default
  ``$XDG_CACHE_HOME/spmd_diffusion`` or ``~/.cache/spmd_diffusion``)
- ``SPMD_DIFFUSION_AUTHKEY``: shared secret of the external executor and ``omni-diffuse worker``
- ``SPMD_DIFFUSION_API_KEY``: bearer token of ``omni-diffuse serve`` (same as ``--api-key``) and
  of the HTTP executor
- ``SPMD_DIFFUSION_LOG_LEVEL``: log level of every rank (default INFO on rank 0, WARNING
  elsewhere)
- ``SPMD_DIFFUSION_SPIN_S``: how long an idle MPI rank spins before it starts sleeping (default
  0.002)
- ``SPMD_DIFFUSION_MAX_SLEEP_S``: the longest sleep between polls of an idle rank (default
  0.002)
- ``MASTER_ADDR`` / ``MASTER_PORT``: where torch.distributed meets (torchrun sets them; under
  srun they are derived from the step; a multi-node MPI job's tensor-parallel rendezvous uses
  them if set, else every non-loopback address of rank 0's node)
- ``SPMD_DIFFUSION_INIT_TIMEOUT_S``: how long the torch.distributed control group may take to
  form (default 120)
- ``LOCAL_WORLD_SIZE``: ranks on this node, when the launcher says so
- ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``: the network interface of gloo / NCCL; set to
  ``lo`` by default for one-node jobs so nothing listens beyond loopback; across nodes
  GLOO_SOCKET_IFNAME defaults to the interface that reaches rank 0
- ``XDG_CACHE_HOME``: base of the default cache directory
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def environment() -> MutableMapping[str, str]:
    """The process environment (launcher detection reads its variables from here)."""
    return os.environ


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise ValueError(f"${name} must be a number of seconds, got {value!r}") from None


def cache_dir() -> str:
    if os.environ.get("SPMD_DIFFUSION_CACHE"):
        return os.environ["SPMD_DIFFUSION_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spmd_diffusion")


AUTHKEY = "SPMD_DIFFUSION_AUTHKEY"


def authkey() -> str | None:
    return os.environ.get(AUTHKEY) or None


API_KEY = "SPMD_DIFFUSION_API_KEY"


def api_key() -> str | None:
    return os.environ.get(API_KEY) or None


def log_level() -> str | None:
    return os.environ.get("SPMD_DIFFUSION_LOG_LEVEL") or None


def spin_seconds() -> float:
    return _float("SPMD_DIFFUSION_SPIN_S", 0.002)


def max_sleep_seconds() -> float:
    return _float("SPMD_DIFFUSION_MAX_SLEEP_S", 0.002)


def init_timeout() -> float:
    return _float("SPMD_DIFFUSION_INIT_TIMEOUT_S", 120.0)


def master_addr() -> str | None:
    return os.environ.get("MASTER_ADDR") or None


def master_port() -> int | None:
    value = os.environ.get("MASTER_PORT")
    return int(value) if value and value.isdigit() else None


def local_world_size(default: int = 1) -> int:
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() else default


def set_default(name: str, value: str, env: MutableMapping[str, str] | None = None) -> None:
    """Set ``name`` unless the user already did."""
    target = os.environ if env is None else env
    target.setdefault(name, value)


# What a one-node job binds to loopback, unless the user set it: gloo and NCCL (which
# otherwise bind the address the host name resolves to), and MPI's network layers, read at
# MPI_Init (pip's MPICH 5 runs UCX by default and libfabric with MPIR_CVAR_CH4_NETMOD=ofi;
# each otherwise listens on the machine's LAN address on every rank, even for a one-node
# job). Within a node MPI's messages go through shared memory anyway.
LOOPBACK_INTERFACES = (
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "UCX_NET_DEVICES",
    "FI_TCP_IFACE",
    "FI_SOCKETS_IFACE",
)


def keep_on_loopback(one_node: bool) -> None:
    """One-node jobs: every socket of the job's own libraries on the loopback interface
    (:data:`LOOPBACK_INTERFACES`), so nothing of the job listens on the network."""
    if one_node:
        for name in LOOPBACK_INTERFACES:
            set_default(name, "lo")
