"""MPIControl: the control plane over mpi4py.

- Calls: one non-blocking broadcast of a fixed slot (``Ibcast``), polled with
  :class:`Backoff` by idle ranks, so they do not busy-poll a core the way a blocking MPICH
  call does. Messages too big for the slot follow in a second broadcast.
- Replies: one point-to-point message of pickled bytes, found by rank 0 with a matched
  probe (``Improbe``) so every wait can end at a deadline. A reply past 1 GiB goes through
  ``mpi4py.util.pkl5`` instead, which has no 2 GiB limit.
- Everything runs on a duplicate of COMM_WORLD, so user code on COMM_WORLD cannot collide.

mpi4py is imported here only, and its thread level is set to "funneled" first: only the
main thread talks MPI, and MPI_THREAD_MULTIPLE would slow every call.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from spmd_diffusion.distributed.control.base import (
    SLOT_BYTES,
    Backoff,
    ControlPlane,
    LaunchError,
    encode_slot,
    slot_length,
    slot_payload,
)
from spmd_diffusion.distributed.launcher import LaunchInfo

TAG_TO_ROOT = 77
TAG_LARGE = 78
LARGE_BYTES = 1 << 30
LARGE_MARKER = b"\x00spmd-diffusion-large\x00"


def import_mpi() -> Any:
    """``mpi4py.MPI``, initialised with the thread level this package needs."""
    if "mpi4py.MPI" not in sys.modules:
        import mpi4py

        mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    return MPI


def mismatch_diagnosis(launch: LaunchInfo, MPI: Any) -> str:
    version = MPI.Get_library_version().strip().splitlines()[0]
    hint = (
        "srun started the tasks, but this MPI library does not speak srun's PMI: try "
        "`srun --mpi=pmix` (or --mpi=pmi2), launch with mpirun/mpiexec instead, or use "
        "`--executor torchrun` (torch.distributed over Slurm's variables)"
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
        self.slot = bytearray(SLOT_BYTES)  # receive buffer, reused: unpickled before the next call
        self.send_slot = bytearray(SLOT_BYTES)  # rank 0's, reused: each broadcast completes first

    def broadcast(self, obj: Any) -> None:
        slot, rest = encode_slot(obj, self.send_slot)
        self.comm.Ibcast(slot, root=0).Wait()
        if rest is not None:
            self.comm.Ibcast(bytearray(rest), root=0).Wait()

    def receive_broadcast(self) -> Any:
        slot = self.slot
        request = self.comm.Ibcast(slot, root=0)
        self.backoff.wait(request.Test)
        data = slot_payload(slot)
        if data is None:
            data = bytearray(slot_length(slot))
            self.comm.Ibcast(data, root=0).Wait()
        return pickle.loads(data)

    def send_to_root(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=5)
        if len(data) < LARGE_BYTES:
            self.comm.Send(data, dest=0, tag=TAG_TO_ROOT)
        else:  # past MPI's int count: a marker, then mpi4py's pkl5 path on its own tag
            self.comm.Send(LARGE_MARKER, dest=0, tag=TAG_TO_ROOT)
            self.pkl5.send(obj, dest=0, tag=TAG_LARGE)

    def _receive_one(self, message: Any, status: Any) -> Any:
        buffer = bytearray(status.Get_count(self.MPI.BYTE))
        message.Recv(buffer)
        if buffer == LARGE_MARKER:
            return self.pkl5.recv(source=status.Get_source(), tag=TAG_LARGE)
        return pickle.loads(buffer)

    def receive_from(self, ranks: list[int], deadline: float | None) -> dict[int, Any]:
        pending, received = set(ranks), {}
        status, improbe, any_source = self.status, self.comm.Improbe, self.MPI.ANY_SOURCE

        def arrived() -> bool:
            while pending:
                message = improbe(source=any_source, tag=TAG_TO_ROOT, status=status)
                if message is None:
                    return False
                source = status.Get_source()
                received[source] = self._receive_one(message, status)
                pending.discard(source)
            return True

        self.backoff.wait(arrived, deadline)
        return received

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.MPI.COMM_WORLD.Abort(code)
