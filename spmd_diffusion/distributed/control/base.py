"""The ControlPlane interface, its process-wide instance, and the idle-wait policy.

A control plane moves the RPC messages of an SPMD job over the launcher's own channel
(MPI point-to-point, or a gloo group) -- nothing else of the job listens for them. It is
point-to-point only, from one sender (rank 0): MPI and gloo deliver the messages between
two ranks in the order they were sent, so every rank sees rank 0's messages in rank 0's
order, and the members of a tensor-parallel replica never disagree about what comes next
(a broadcast for collective calls beside point-to-point work would give no such order).
"""

# ruff: noqa: PLC0415 - project modules load where used (distributed.control.mpi_control,
# distributed.control.torch_control): they pull in heavy modules or import back into this one

from __future__ import annotations

import importlib.util
import pickle
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.distributed.launcher import MPI, SLURM, TORCHRUN, LaunchInfo
from spmd_diffusion.errors import LaunchError

# Small messages (most RPC tuples) travel as one fixed-size slot; larger ones follow the slot
# in a second message (gloo needs the size before it can receive).
SLOT_BYTES = 1024
HEADER_BYTES = 8


class Backoff:
    """Spin briefly, then sleep in growing steps: an idle rank costs little CPU.

    A call that arrives within ``spin_s`` of the wait starting is seen at once; after that
    the extra latency is at most ``max_sleep_s`` (the price of not burning a core).
    """

    def __init__(self, spin_s: float | None = None, max_sleep_s: float | None = None) -> None:
        self.spin_s = spin_s if spin_s is not None else envs.spin_seconds()
        self.max_sleep_s = max_sleep_s if max_sleep_s is not None else envs.max_sleep_seconds()

    def wait(self, done: Callable[[], bool], deadline: float | None = None) -> bool:
        """Poll ``done`` until it is true (True) or the monotonic ``deadline`` passes (False)."""
        if done():
            return True
        start = time.monotonic()
        spin_until = start + self.spin_s
        pause = 50e-6
        polls = 0
        while not done():
            polls += 1
            if polls & 63:  # read the clock every 64 polls: the spin stays tight
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if now > spin_until:
                time.sleep(pause)
                pause = min(pause * 2, self.max_sleep_s)
                polls = 63  # sleeping: check the clock after every poll
        return True


def encode_slot(obj: Any, slot: bytearray | None = None) -> tuple[bytearray, bytes | None]:
    """A SLOT_BYTES buffer (``slot`` reused if given) holding the length and, if it fits,
    the pickled message; otherwise the pickled bytes are returned to send after it."""
    data = pickle.dumps(obj, protocol=5)
    if slot is None:
        slot = bytearray(SLOT_BYTES)
    length = len(data)
    slot[:HEADER_BYTES] = length.to_bytes(HEADER_BYTES, "little")
    if length <= SLOT_BYTES - HEADER_BYTES:
        slot[HEADER_BYTES : HEADER_BYTES + length] = data
        return slot, None
    return slot, data


def slot_length(slot: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(slot[:HEADER_BYTES], "little")


def slot_payload(slot: bytes | bytearray) -> memoryview | None:
    """The inline message (a view, not a copy), or None when it follows in a second message."""
    length = int.from_bytes(slot[:HEADER_BYTES], "little")
    if length <= SLOT_BYTES - HEADER_BYTES:
        return memoryview(slot)[HEADER_BYTES : HEADER_BYTES + length]
    return None


class ControlPlane(ABC):
    """Rank 0 sends requests to any rank and collects replies; every other rank receives
    from rank 0 and replies to it. Rank 0's methods are safe to call from several threads."""

    kind: str
    rank: int
    size: int
    local_rank: int
    local_size: int
    serving: bool = False  # rank 0: an executor session holds the other ranks
    can_peek: bool = False  # poll_from_root can tell that a message waits (MPI), not only receive

    @property
    def one_node(self) -> bool:
        return self.local_size == self.size

    # -- rank 0 ------------------------------------------------------------------------------
    @abstractmethod
    def send(self, rank: int, obj: Any) -> None:
        """Queue ``obj`` for ``rank`` without waiting for it to be received."""

    @abstractmethod
    def poll_replies(self, ranks: Collection[int]) -> list[Any]:
        """Every reply that has arrived from ``ranks``, without waiting."""

    @abstractmethod
    def flush(self, timeout: float) -> bool:
        """Wait until every queued send has left (False at the timeout)."""

    def share_inbox(self, inbox: Any) -> bool:
        """Deliver replies into ``inbox`` (a queue) as they arrive, instead of waiting for
        ``poll_replies``; False where replies can only be polled (MPI)."""
        return False

    # -- every other rank --------------------------------------------------------------------
    @abstractmethod
    def recv_from_root(self) -> Any:
        """Wait (cheaply) for rank 0's next message."""

    @abstractmethod
    def send_to_root(self, obj: Any) -> None:
        """Send one message to rank 0."""

    def poll_from_root(self) -> bool:
        """Whether a message from rank 0 is waiting, without waiting (False where the channel
        cannot tell: gloo can only receive)."""
        return False

    @abstractmethod
    def abort(self, code: int) -> None:
        """End the whole job now (every rank), with exit code ``code``."""

    def describe(self) -> str:
        return (
            f"{self.kind} rank {self.rank}/{self.size} (local {self.local_rank}/{self.local_size})"
        )


class RootChannel:
    """A non-root rank's side of the control plane as a channel (wrap it in a
    :class:`~spmd_diffusion.distributed.protocol.WireEndpoint` for the serve loop)."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def recv(self) -> Any:
        return self.control.recv_from_root()

    def send(self, obj: Any) -> None:
        self.control.send_to_root(obj)

    def poll(self, timeout: float = 0.0) -> bool:
        return self.control.poll_from_root()


_INSTANCE: ControlPlane | None = None


def get_control_plane(launch: LaunchInfo, backend: str | None = None) -> ControlPlane:
    """The process-wide control plane (created once: it initialises MPI or torch.distributed).

    ``backend`` forces ``mpi`` or ``torch``; by default see :func:`default_backend`.
    """
    global _INSTANCE
    if backend is None:
        backend = default_backend(launch)
    if _INSTANCE is not None:
        if _INSTANCE.kind != backend:
            raise LaunchError(
                f"this process already uses the {_INSTANCE.kind} control plane, not {backend}"
            )
        return _INSTANCE
    if backend == "mpi":
        from spmd_diffusion.distributed.control.mpi_control import MPIControl

        _INSTANCE = MPIControl(launch)
    elif backend == "torch":
        from spmd_diffusion.distributed.control.torch_control import TorchControl

        _INSTANCE = TorchControl(launch)
    else:
        raise ValueError(f"unknown control backend {backend!r}")
    return _INSTANCE


def default_backend(launch: LaunchInfo, env: Mapping[str, str] | None = None) -> str:
    """MPI for MPI launches, torch for torchrun; for srun, MPI when mpi4py is installed and
    srun gave the tasks a PMI (``--mpi=pmi2``/``pmix``: ``PMI_RANK``/``PMIX_RANK`` set),
    else torch.distributed over Slurm's variables (``--mpi=none``, Slurm's usual default:
    MPI would see N separate worlds of 1). Decided from the environment alone, so every
    rank decides the same."""
    if launch.kind == MPI:
        return "mpi"
    if launch.kind == TORCHRUN:
        return "torch"
    if launch.kind == SLURM:
        env = envs.environment() if env is None else env
        has_pmi = "PMI_RANK" in env or "PMIX_RANK" in env
        return "mpi" if has_pmi and importlib.util.find_spec("mpi4py") else "torch"
    raise LaunchError("no launcher detected: start the job with mpirun, srun or torchrun")


def current_control_plane() -> ControlPlane | None:
    """The control plane if one was created in this process (for fatal-error handling)."""
    return _INSTANCE
