"""SPMD executors: every rank runs the same program; rank 0 is the engine.

Rank 0 sends each call to the ranks it concerns over the launcher's control plane and runs
its own share on its own worker thread (no GPU idles), then collects one reply per rank with
a deadline. The other ranks live in :func:`serve_spmd_rank` until rank 0 shuts down.

- :class:`MPIExecutor` (``mpi``): the control plane is mpi4py (mpirun, mpiexec, srun+PMI).
- :class:`TorchDistributedExecutor` (``torchrun``): a gloo CPU group (torchrun, srun).

Constructing either on a rank other than 0 serves calls there and then raises
:class:`WorkerRankDone` (a ``SystemExit``), so ``DiffusionEngine(config)`` returns on rank 0
only; use :func:`spmd_diffusion.spmd.spmd_engine` where every rank must carry on.
"""

from __future__ import annotations

import atexit
import logging
import traceback

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.control import ControlPlane, RootChannel, get_control_plane
from spmd_diffusion.distributed.launcher import detect_launcher
from spmd_diffusion.distributed.local_worker import LocalWorker
from spmd_diffusion.distributed.protocol import (
    MessageKind,
    RpcRequest,
    WireEndpoint,
    request_to_wire,
)
from spmd_diffusion.distributed.rendezvous import RendezvousServer
from spmd_diffusion.distributed.serve_loop import WorkerPlacement, run_worker_rank
from spmd_diffusion.distributed.transport import SPMDTransport
from spmd_diffusion.errors import WorkerError, interrupt_exit_code
from spmd_diffusion.executor.rpc_executor import RpcExecutor
from spmd_diffusion.exit_codes import EXIT_INTERRUPTED
from spmd_diffusion.utils.logs import setup_logging

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0


class WorkerRankDone(SystemExit):
    """A rank other than 0 finished serving (rank 0 shut the engine down)."""


def placement_of(control: ControlPlane) -> WorkerPlacement:
    return WorkerPlacement(control.rank, control.size, control.local_rank, control.local_size)


def fatal(control: ControlPlane, exc: BaseException) -> None:
    """An error outside any RPC: print it once, with the rank, and end the whole job."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    logger.critical("fatal error, ending the job:\n%s", text.rstrip())
    control.abort(1)


def serve_spmd_rank(control: ControlPlane) -> int:
    """A non-root rank's life: START or ABORT from rank 0, load, serve; the exit code."""
    setup_logging(control.rank)
    try:
        return run_worker_rank(WireEndpoint(RootChannel(control)), placement_of(control))
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM reach every rank of the job: leave quietly
        return interrupt_exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - anything here would leave rank 0 waiting
        fatal(control, exc)
        raise


def serve_unless_rank0(control: ControlPlane | None) -> int | None:
    """The one place that decides what a rank does in an SPMD job: rank 0 (or a process
    without a launched job) gets None and builds the engine; any other rank serves rank 0's
    calls until it is released, and gets its exit code. The executor, the CLI's
    :func:`~spmd_diffusion.entrypoints.spmd.run_spmd` and
    :func:`~spmd_diffusion.entrypoints.spmd.spmd_engine` all ask here."""
    if control is None or control.rank == 0:
        return None
    return serve_spmd_rank(control)


def release_waiting_ranks(control: ControlPlane | None, code: int, timeout: float = 10.0) -> None:
    """Rank 0 failed before an executor took the other ranks (or was interrupted after):
    tell them to exit with ``code`` (a busy rank sees it once its call is done)."""
    if control is None or control.size == 1 or control.serving:
        return
    for rank in range(1, control.size):
        control.send(rank, request_to_wire(RpcRequest(MessageKind.ABORT, args=(code,))))
    control.flush(timeout=timeout)


class SPMDExecutor(RpcExecutor):
    """Base of the executors whose workers are the ranks of the job itself."""

    spmd = True
    writes_outputs = True
    control_backend = ""

    @classmethod
    def planned_world_size(cls, od_config: OmniDiffusionConfig) -> int:
        return detect_launcher().world_size

    def _init_executor(self) -> None:
        self._open_calls()
        self.control = get_control_plane(detect_launcher(), self.control_backend)
        code = serve_unless_rank0(self.control)
        if code is not None:
            raise WorkerRankDone(code)
        layout = self.od_config.parallel_layout(
            self.control.size
        )  # refuses a tp x cfg that does not divide
        self.control.serving = True
        self.local = LocalWorker(placement_of(self.control), name="spmd-diffusion-rank0-worker")
        self.transport = SPMDTransport(self.control, self.local)
        self.rendezvous = None
        atexit.register(self.shutdown)
        try:
            if layout.replica_size > 1 and not _torch_group_exists():
                self.rendezvous = RendezvousServer(self.control.size, self.control.one_node)
            self.start_workers(
                (self.od_config, self.rendezvous and self.rendezvous.rendezvous),
                self.od_config.startup_timeout,
            )
        except BaseException:
            self.shutdown()
            raise
        logger.info("%s ready: %s", type(self).__name__, self.control.describe())

    def shutdown(self) -> None:
        """Release every rank. After a timed-out call a rank may still be busy, so a failed
        executor ends the whole job instead (nothing else can be sure to stop it)."""
        if getattr(self, "is_closed", True) or not hasattr(self, "local"):
            return
        self.is_closed = True
        atexit.unregister(self.shutdown)
        if (
            self.interrupted
        ):  # Ctrl-C: every rank got it too; release any that did not, wait for none
            self.control.serving = False
            release_waiting_ranks(self.control, EXIT_INTERRUPTED, timeout=1.0)
            return
        if not self.is_failed and not self.stop_workers(SHUTDOWN_GRACE_S):
            self.is_failed = True
            self.failure = self.failure or RuntimeError(
                "a rank did not acknowledge shutdown in time"
            )
        if self.is_failed:
            failure = self.failure
            logger.debug("ending the job: %s", failure)  # with -v: every rank's traceback
            logger.critical(
                "ending the job: %s",
                failure.brief() if isinstance(failure, WorkerError) else failure,
            )
            self.control.abort(1)
            return
        self.control.flush(timeout=SHUTDOWN_GRACE_S)
        self.control.serving = False
        self.local.join(SHUTDOWN_GRACE_S)
        if self.rendezvous is not None:
            self.rendezvous.close()


def _torch_group_exists() -> bool:
    """torchrun (and srun with --executor torchrun) already made the default process group."""
    import torch.distributed as dist  # noqa: PLC0415 - torch is heavy

    return dist.is_available() and dist.is_initialized()


class MPIExecutor(SPMDExecutor):
    """SPMD over mpi4py: for mpirun/mpiexec, and srun with an MPI that speaks its PMI."""

    control_backend = "mpi"


class TorchDistributedExecutor(SPMDExecutor):
    """SPMD over a torch.distributed gloo group: for torchrun, and srun without MPI."""

    control_backend = "torch"
