"""UniProcDiffusionExecutor (``uni``): one worker in the caller's own process.

No process boundary, so it is the cheapest executor and the reference the others must
match pixel for pixel. Calls run on one helper thread so a timeout returns control to the
caller; the stuck call cannot be interrupted, so the executor is marked failed.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from spmd_diffusion.errors import ExecutorClosedError, ExecutorTimeoutError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.distributed.protocol import RpcMethod, collect_replies, method_name, run_rpc


class UniProcDiffusionExecutor(DiffusionExecutor):
    spmd = False

    def _init_executor(self) -> None:
        from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

        self.worker = DiffusionWorker(self.od_config, rank=0, local_rank=0, world_size=1)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="uni-worker")

    def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        if self.is_closed or self.is_failed:
            raise ExecutorClosedError(f"{type(self).__name__} is {'failed' if self.is_failed else 'shut down'}")
        if timeout is None:  # nothing to enforce: run on the caller's thread, no hand-off
            return collect_replies(method, [run_rpc(self.worker, 0, method, args, kwargs)], unique_reply_rank)
        future = self._thread.submit(run_rpc, self.worker, 0, method, args, kwargs)
        try:
            reply = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self.is_failed = True
            raise ExecutorTimeoutError(method_name(method), timeout, [0]) from None
        return collect_replies(method, [reply], unique_reply_rank)

    def shutdown(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        if not self.is_failed:
            self.worker.shutdown()
        self._thread.shutdown(wait=False)
