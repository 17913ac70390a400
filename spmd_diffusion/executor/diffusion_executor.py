"""DiffusionExecutor: the one small interface between the engine and its workers.

A backend only has to say how a call reaches every worker (``collective_rpc``); running
the model, health checks and sleep/wake are calls like any other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.distributed.protocol import RpcMethod


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

    @abstractmethod
    def _init_executor(self) -> None:
        """Start workers, open connections: whatever this backend needs."""

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
            f"{type(self).__name__} does not implement collective_rpc; override it (or execute_model)"
        )

    def execute_model(self, requests: list[OmniDiffusionRequest]) -> DiffusionOutput | None:
        """Generate images for ``requests``; rank 0's worker returns the output."""
        return self.collective_rpc(
            "generate", timeout=self.od_config.generate_timeout, args=(list(requests),), unique_reply_rank=0
        )

    def execute_stream(
        self,
        batches: list[list[OmniDiffusionRequest]],
        on_output: Callable[[DiffusionOutput], None],
    ) -> None:
        """Generate every batch, calling ``on_output`` with each batch's output as soon as it
        exists, in whatever order batches finish. Executors with several replicas override
        this to keep them all busy; this default runs the batches one after another."""
        for batch in batches:
            output = self.execute_model(batch)
            if output is None:
                raise RuntimeError(f"{type(self).__name__}.execute_model returned no output")
            on_output(output)

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
