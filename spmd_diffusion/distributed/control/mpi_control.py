"""MPIControl: the control plane over mpi4py point-to-point messages.

- Rank 0 -> rank r: one ``Isend`` of the pickled request (rank 0 never blocks on a busy
  rank; the buffers are kept until MPI is done with them).
- Idle ranks find rank 0's next message with a matched probe (``Improbe``) polled through
  :class:`Backoff`, so they do not busy-poll a core the way a blocking MPICH call does.
- Replies: one message of pickled bytes, found by rank 0 with ``Improbe`` on any source so
  every wait can end at a deadline and replicas answer in whatever order they finish. A
  reply past 1 GiB goes through ``mpi4py.util.pkl5``, which has no 2 GiB limit.
- Everything runs on a duplicate of COMM_WORLD, so user code on COMM_WORLD cannot collide.

mpi4py is imported here only, with the thread level "multiple": on rank 0 the engine's
threads talk MPI (one at a time, under ``self.lock``) while rank 0's own worker thread may
run a user's callable that uses MPI too. With pip's MPICH a round trip costs the same under
"serialized" and "multiple" (benchmarks/RESULTS.md, "Measurements behind design choices").
"""

# ruff: noqa: PLC0415 - optional extras load only where used (mpi4py)

from __future__ import annotations

import pickle
import sys
import threading
import time
from collections.abc import Collection
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.distributed.control.base import Backoff, ControlPlane
from spmd_diffusion.distributed.launcher import LaunchInfo
from spmd_diffusion.errors import LaunchError

TAG_REQUEST = 76
TAG_REPLY = 77
TAG_LARGE = 78
LARGE_BYTES = 1 << 30
REAP_AFTER = 64
ABORT_FLUSH_S = 0.5  # time the launcher gets to forward the last lines before MPI_Abort
LARGE_MARKER = b"\x00spmd-diffusion-large\x00"


def import_mpi() -> Any:
    """``mpi4py.MPI``, initialised with the thread level this package needs."""
    if "mpi4py.MPI" not in sys.modules:
        import mpi4py

        mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI

    return MPI


def mismatch_diagnosis(launch: LaunchInfo, MPI: Any) -> str:
    version = MPI.Get_library_version().strip().splitlines()[0]
    hint = (
        "srun started the tasks, but this MPI library does not speak srun's PMI: try "
        "`srun --mpi=pmi2` (pip's MPICH speaks pmi2, not pmix), launch with mpirun/mpiexec "
        "instead, or use `--executor torchrun` (torch.distributed over Slurm's variables)"
        if launch.kind == "slurm"
        else "the launcher's MPI is not the one mpi4py was built against: use the mpirun/mpiexec "
        "of the same MPI (with pip's mpich: the one in the virtual environment's bin/)"
    )
    return (
        f"the launcher ({launch.kind}) says {launch.world_size} ranks, but MPI sees a world of 1 "
        f"(MPI library: {version}); {hint}"
    )


class MPIControl(ControlPlane):
    kind = "mpi"

    def __init__(self, launch: LaunchInfo) -> None:
        envs.keep_on_loopback(launch.local_world_size == launch.world_size)  # read by MPI_Init
        MPI = import_mpi()
        self.MPI = MPI
        world = MPI.COMM_WORLD
        if launch.world_size > 1 and world.Get_size() == 1:
            raise LaunchError(mismatch_diagnosis(launch, MPI))
        self.comm = world.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        from mpi4py.util import pkl5

        self.pkl5 = pkl5.Intracomm(self.comm)
        self.backoff = Backoff()
        self.status = MPI.Status()
        self.lock = threading.Lock()
        self._sending: list[tuple[Any, bytes]] = []  # (request, buffer) until MPI is done with it

    # -- rank 0 ------------------------------------------------------------------------------
    def _reap(self) -> None:
        self._sending = [(request, data) for request, data in self._sending if not request.Test()]

    def send(self, rank: int, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        with self.lock:
            self._sending.append((self.comm.Isend(data, dest=rank, tag=TAG_REQUEST), data))
            if len(self._sending) > REAP_AFTER:  # polls reap too: keep the send path short
                self._reap()

    def _receive(self, message: Any, status: Any) -> Any:
        buffer = bytearray(status.Get_count(self.MPI.BYTE))
        message.Recv(buffer)
        if buffer == LARGE_MARKER:
            return self.pkl5.recv(source=status.Get_source(), tag=TAG_LARGE)
        return pickle.loads(buffer)

    def poll_replies(self, ranks: Collection[int]) -> list[Any]:
        arrived = []
        with self.lock:
            while True:
                message = self.comm.Improbe(
                    source=self.MPI.ANY_SOURCE, tag=TAG_REPLY, status=self.status
                )
                if message is None:
                    break
                arrived.append(self._receive(message, self.status))
            if self._sending:
                self._reap()
        return arrived

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout

        def sent() -> bool:
            with self.lock:
                self._reap()
                return not self._sending

        return self.backoff.wait(sent, deadline)

    # -- every other rank --------------------------------------------------------------------
    def recv_from_root(self) -> Any:
        status, found = self.status, []

        def arrived() -> bool:
            message = self.comm.Improbe(source=0, tag=TAG_REQUEST, status=status)
            if message is not None:
                found.append(message)
            return bool(found)

        self.backoff.wait(arrived)
        buffer = bytearray(status.Get_count(self.MPI.BYTE))
        found[0].Recv(buffer)
        return pickle.loads(buffer)

    can_peek = True

    def poll_from_root(self) -> bool:
        return bool(self.comm.Iprobe(source=0, tag=TAG_REQUEST))

    def send_to_root(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        if len(data) < LARGE_BYTES:
            self.comm.Send(data, dest=0, tag=TAG_REPLY)
        else:  # past MPI's int count: a marker, then mpi4py's pkl5 path on its own tag
            self.comm.Send(LARGE_MARKER, dest=0, tag=TAG_REPLY)
            self.pkl5.send(obj, dest=0, tag=TAG_LARGE)

    def abort(self, code: int) -> None:
        """End every rank. MPICH's launcher forwards each rank's output asynchronously and
        drops what it has not forwarded when the abort kills the job: the line that says why
        (written just before) was lost now and then, so the forwarding gets a moment first."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_FLUSH_S)
        self.MPI.COMM_WORLD.Abort(code)
