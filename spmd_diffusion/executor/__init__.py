"""Executors: how the engine's calls reach the workers.

Concrete executors are imported lazily (attribute access), so importing this package never
imports mpi4py, torch.distributed or an HTTP client before they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.executor.registry import (
    BUILTIN_EXECUTORS,
    ENTRY_POINT_GROUP,
    executor_names,
    resolve_executor_class,
)

_LAZY = {
    "MultiProcDiffusionExecutor": "spmd_diffusion.executor.multiproc_executor",
    "UniProcDiffusionExecutor": "spmd_diffusion.executor.uniproc_executor",
    "ExternalDiffusionExecutor": "spmd_diffusion.executor.external_executor",
    "HTTPDiffusionExecutor": "spmd_diffusion.executor.external_executor",
    "MPIExecutor": "spmd_diffusion.executor.spmd_executor",
    "TorchDistributedExecutor": "spmd_diffusion.executor.spmd_executor",
    "RayDiffusionExecutor": "spmd_diffusion.executor.ray_executor",
}

__all__ = [
    "BUILTIN_EXECUTORS",
    "DiffusionExecutor",
    "ENTRY_POINT_GROUP",
    "executor_names",
    "resolve_executor_class",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
