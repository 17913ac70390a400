"""Executors that misbehave on purpose, for the tests that the engine notices.

Loaded by dotted path (``--executor fault_executors.LossyMPIExecutor``) with ``tests/`` on
PYTHONPATH, so they run inside a real ``mpiexec`` job.
"""

from __future__ import annotations

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.executor.diffusion_executor import CompletedCall
from spmd_diffusion.executor.spmd_executor import MPIExecutor

LOST_ITEM = "000003"


class LossyMPIExecutor(MPIExecutor):
    """Loses the batch that holds item ``LOST_ITEM``: it answers it at once with an output
    that holds nothing, the way a tampered or buggy transport would."""

    def submit(self, replica, method, args=(), kwargs=None, timeout=None):
        if method == "generate" and any(request.request_id == LOST_ITEM for request in args[0]):
            return CompletedCall(replica, "generate", DiffusionOutput())
        return super().submit(replica, method, args, kwargs, timeout)
