"""The one place that turns ``executor_class`` into a class.

Accepted: None (the default for how the job was launched), a built-in short name, the
name of an entry point in the group ``spmd_diffusion.executors``, a dotted path
(``pkg.module.Class`` or ``pkg.module:Class``), or a DiffusionExecutor subclass.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from spmd_diffusion.distributed.control.base import default_backend
from spmd_diffusion.distributed.launcher import NONE, detect_launcher
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.utils.imports import import_by_path

ENTRY_POINT_GROUP = "spmd_diffusion.executors"

BUILTIN_EXECUTORS: dict[str, str] = {
    "mp": "spmd_diffusion.executor.multiproc_executor:MultiProcDiffusionExecutor",
    "uni": "spmd_diffusion.executor.uniproc_executor:UniProcDiffusionExecutor",
    "mpi": "spmd_diffusion.executor.spmd_executor:MPIExecutor",
    "torchrun": "spmd_diffusion.executor.spmd_executor:TorchDistributedExecutor",
    "external": "spmd_diffusion.executor.external_executor:ExternalDiffusionExecutor",
    "http": "spmd_diffusion.executor.external_executor:HTTPDiffusionExecutor",
    "ray": "spmd_diffusion.executor.ray_executor:RayDiffusionExecutor",
}


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def executor_names() -> list[str]:
    """Every short name that resolves: built-ins first, then installed entry points."""
    return list(BUILTIN_EXECUTORS) + sorted(set(_entry_points()) - set(BUILTIN_EXECUTORS))


def default_executor_name() -> str:
    """The launcher's executor (mpi / torchrun); without one, a worker process per GPU."""
    launch = detect_launcher()
    if launch.kind == NONE:
        return "mp"
    return "mpi" if default_backend(launch) == "mpi" else "torchrun"


def _check_class(value: Any, origin: str) -> type[DiffusionExecutor]:
    if not (isinstance(value, type) and issubclass(value, DiffusionExecutor)):
        raise ValueError(f"executor_class {origin} is {value!r}, not a DiffusionExecutor subclass")
    return value


def resolve_executor_class(value: Any) -> type[DiffusionExecutor]:
    if value is None:
        value = default_executor_name()
    if isinstance(value, type):
        return _check_class(value, repr(value.__name__))
    if not isinstance(value, str):
        raise ValueError(
            "executor_class must be None, a name, a dotted path or a class, got "
            f"{type(value).__name__}"
        )
    if value in BUILTIN_EXECUTORS:
        return _check_class(import_by_path(BUILTIN_EXECUTORS[value]), repr(value))
    points = _entry_points()
    if value in points:
        return _check_class(points[value].load(), f"entry point {value!r}")
    if "." in value or ":" in value:
        try:
            found = import_by_path(value)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"executor_class {value!r} cannot be imported: {exc}") from exc
        return _check_class(found, repr(value))
    raise ValueError(
        f"unknown executor_class {value!r}; valid names: {', '.join(executor_names())}, "
        "or a dotted path such as 'my_package.MyExecutor', or a DiffusionExecutor subclass"
    )


def check_executor_for_launch(executor_class: type[DiffusionExecutor]) -> None:
    """A one-process executor must not be started by every rank of a multi-rank launch."""
    launch = detect_launcher()
    if launch.world_size > 1 and executor_class.spmd is False:
        raise ValueError(
            f"executor {executor_class.__name__} runs in one process, but {launch.kind} started "
            f"{launch.world_size} ranks: use executor_class 'mpi' or 'torchrun' (or leave it unset)"
        )
