"""DiffusionExecutor: the one small interface between the engine and its workers.

A backend only has to say how a call reaches every worker (``collective_rpc``); running
the model, health checks and sleep/wake are calls like any other. The engine's replica
scheduler talks to an executor through three more members, which have working defaults
for executors that only implement ``collective_rpc`` or ``execute_model``:

- ``parallel_layout``: how the executor's ranks split into data-parallel replicas;
- ``submit(replica, method, ...)``: start a call on one replica's ranks, return a handle;
- ``wait(calls, timeout)``: the handles that have finished.
"""

# ruff: noqa: PLC0415 - the registry imports every executor module, which import this one

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import RpcMethod
from spmd_diffusion.layout import ParallelLayout
from spmd_diffusion.request import OmniDiffusionRequest


class ReplicaCall:
    """A call on one replica: ``done`` once every rank of the replica answered; ``result()``
    returns the replica leader's value or raises the call's error."""

    replica: int
    name: str
    on_note: Any = None  # called with each StepNote the replica sends while the call runs
    released: bool = (
        False  # the replica handed the batch to its output writer: it may take the next
    )

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


class CompletedCall(ReplicaCall):
    """A call that ran synchronously, for executors without per-replica submission."""

    def __init__(
        self, replica: int, name: str, value: Any = None, error: BaseException | None = None
    ) -> None:
        self.replica, self.name, self.value, self.error = replica, name, value, error

    @property
    def done(self) -> bool:
        return True

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class DiffusionExecutor(ABC):
    """Base class of every executor. ``DiffusionExecutor(config)`` calls ``_init_executor()``.

    Subclasses implement ``_init_executor`` and ``collective_rpc`` (or, for systems with a
    native inference API, ``execute_model``), and usually ``check_health`` and ``shutdown``.
    """

    uses_multiproc: bool = False
    # True: the executor's workers are the ranks of an SPMD job (mpi, torchrun).
    # False: it runs in one process and must not be started by every rank of a launcher.
    # None: unknown (a third-party executor), so it is not checked.
    spmd: bool | None = None
    # True: the replica leaders share the engine's filesystem and write a batch job's
    # outputs themselves; False: outputs come back to the engine, which writes them.
    writes_outputs: bool = False
    # Set when the engine's user pressed Ctrl-C: shut down at once, wait for nobody.
    interrupted: bool = False

    def __init__(self, od_config: OmniDiffusionConfig) -> None:
        self.od_config = od_config
        self.is_failed = False
        self.is_closed = False
        self._init_executor()

    @staticmethod
    def get_class(od_config: OmniDiffusionConfig) -> type[DiffusionExecutor]:
        """The executor class that ``od_config.executor_class`` names (see the registry)."""
        from spmd_diffusion.executor.registry import resolve_executor_class

        return resolve_executor_class(od_config.executor_class)

    @classmethod
    def planned_world_size(cls, od_config: OmniDiffusionConfig) -> int | None:
        """How many ranks this executor would run ``od_config`` on (None: unknown), so the
        layout can be checked before anything starts."""
        return None

    @abstractmethod
    def _init_executor(self) -> None:
        """Start workers, open connections: whatever this backend needs."""

    # -- layout ------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return 1

    @property
    def parallel_layout(self) -> ParallelLayout:
        """How this executor's ranks split into replicas (dp) of cfg x tp ranks. An executor
        that does not say how many ranks it has is one replica of one rank."""
        if self.world_size == 1:
            return ParallelLayout(1)
        return self.od_config.parallel_layout(self.world_size)

    @property
    def num_replicas(self) -> int:
        return self.parallel_layout.dp

    # -- calls -------------------------------------------------------------------------------
    def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """Run ``method`` (a worker method name, or a callable taking the worker) on every rank.

        Returns one result per rank, or only ``unique_reply_rank``'s result. A failure on any
        rank raises one :class:`~spmd_diffusion.errors.WorkerError` naming the rank(s).
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement collective_rpc; "
            "override it (or execute_model)"
        )

    def execute_model(self, requests: list[OmniDiffusionRequest]) -> DiffusionOutput | None:
        """Generate images for ``requests``; rank 0's worker returns the output."""
        return self.collective_rpc(
            "generate",
            timeout=self.od_config.generate_timeout,
            args=(list(requests),),
            unique_reply_rank=0,
        )

    def submit(
        self,
        replica: int,
        method: RpcMethod,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ReplicaCall:
        """Start ``method`` on every rank of ``replica``; the leader's value is the result.

        This default runs the call at once (``generate`` through ``execute_model``, anything
        else through ``collective_rpc``): right for executors with one replica, and for those
        whose system schedules on its own."""
        try:
            if method == "generate" and not kwargs:
                value = self.execute_model(*args)
            else:
                value = self.collective_rpc(
                    method, timeout=timeout, args=args, kwargs=kwargs, unique_reply_rank=0
                )
            return CompletedCall(replica, str(method), value)
        except Exception as exc:  # noqa: BLE001 - handed to whoever reads the result
            return CompletedCall(replica, str(method), error=exc)

    def wait(self, calls: Sequence[ReplicaCall], timeout: float | None = None) -> list[ReplicaCall]:
        """The calls of ``calls`` that are done, waiting up to ``timeout`` for the first."""
        return [call for call in calls if call.done]

    # Whether a submitted ``generate`` may be given ``progress`` (step notes while it runs,
    # signals read between its steps): the built-in executors' workers can.
    supports_progress: bool = False

    def signal_replica(self, replica: int, payload: dict[str, Any]) -> bool:
        """Hand ``payload`` (plain data, e.g. ``{"cancel": [request_id]}``) to the call running
        on ``replica``, read between its steps; False where this executor cannot."""
        return False

    # -- the rest of the contract -------------------------------------------------------------
    def check_health(self) -> None:
        """Raise if any worker cannot serve."""
        self.collective_rpc("check_health", timeout=self.od_config.rpc_timeout)

    def sleep(self, level: int = 1) -> None:
        """Level 1: weights off the accelerator; level 2: weights dropped."""
        self.collective_rpc("sleep", timeout=self.od_config.rpc_timeout, kwargs={"level": level})

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo ``sleep`` for ``tags`` (default: everything)."""
        self.collective_rpc(
            "wake_up", timeout=self.od_config.startup_timeout, kwargs={"tags": tags}
        )

    def shutdown(self) -> None:
        """Release resources. Safe to call more than once."""
        self.is_closed = True

    def __enter__(self) -> DiffusionExecutor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()
