"""UniProcDiffusionExecutor (``uni``): one worker in the caller's own process.

No process boundary, so it is the cheapest executor and the reference the others must
match pixel for pixel. The worker lives on its own thread (the same serve loop every rank
runs), so a timeout returns control to the caller; the stuck call cannot be interrupted,
so the executor is then marked failed.
"""

from __future__ import annotations

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.local_worker import LocalWorker
from spmd_diffusion.distributed.serve_loop import WorkerPlacement
from spmd_diffusion.distributed.transport import LocalTransport
from spmd_diffusion.executor.rpc_executor import RpcExecutor

SHUTDOWN_GRACE_S = 10.0


class UniProcDiffusionExecutor(RpcExecutor):
    spmd = False
    writes_outputs = True

    @classmethod
    def planned_world_size(cls, od_config: OmniDiffusionConfig) -> int:
        return 1

    def _init_executor(self) -> None:
        self._open_calls()
        if self.od_config.num_gpus != 1:
            raise ValueError(
                "the uni executor runs one worker in this process, but "
                f"num_gpus={self.od_config.num_gpus}: "
                "use executor_class 'mp' for several workers"
            )
        self.od_config.parallel_layout(1)  # refuses tp/cfg-parallel, which need several ranks
        self.local = LocalWorker(WorkerPlacement(0, 1, 0, 1), name="spmd-diffusion-uni-worker")
        self.transport = LocalTransport(self.local)
        try:
            self.start_workers((self.od_config, None), self.od_config.startup_timeout)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the worker and wait for its thread (a thread still releasing the pipeline
        when the interpreter exits can abort the process)."""
        if getattr(self, "is_closed", True):
            return
        self.is_closed = True
        local = getattr(self, "local", None)
        if (
            local is not None
            and not (self.is_failed or self.interrupted)
            and self.stop_workers(SHUTDOWN_GRACE_S)
        ):
            local.join(SHUTDOWN_GRACE_S)
