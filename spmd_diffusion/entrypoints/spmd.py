"""Running one program on every rank: the entry points that hide the launcher.

- :func:`spmd_engine`: a context manager that yields the engine on rank 0 and ``None`` on
  the other ranks, after they have served rank 0 until it closed the engine (the pattern of
  ``mpi4py.futures.MPICommExecutor``). Every rank carries on after the block.
- :func:`run_spmd`: what the CLI uses. Rank 0 validates the input first; whatever goes
  wrong on rank 0 before the executor holds the other ranks (bad input: exit 2; anything
  else: exit 1) releases them with one message, so no rank is ever left waiting.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.control import ControlPlane, LaunchError, get_control_plane
from spmd_diffusion.distributed.launcher import LaunchInfo, detect_launcher
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.executor.registry import resolve_executor_class
from spmd_diffusion.executor.spmd_executor import release_waiting_ranks, serve_unless_rank0
from spmd_diffusion.exit_codes import EXIT_FATAL, EXIT_OK, EXIT_USAGE

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def spmd_engine(od_config: OmniDiffusionConfig) -> Iterator[DiffusionEngine | None]:
    """``with spmd_engine(config) as engine:`` -- the engine on rank 0, None elsewhere (after
    that rank served the engine until rank 0 closed it; a non-zero exit code is raised)."""
    code = serve_unless_rank0(spmd_control_plane(od_config))
    if code is not None:
        if code:
            raise SystemExit(code)
        yield None
        return
    with DiffusionEngine(od_config) as engine:
        yield engine


def spmd_control_plane(od_config: OmniDiffusionConfig) -> ControlPlane | None:
    """This process's control plane when a launcher started it and ``od_config`` names an
    SPMD executor (every rank then runs the engine's workers), else None."""
    launch = detect_launcher()
    executor_class = resolve_executor_class(od_config.executor_class)
    if not launch.is_distributed or not executor_class.spmd:
        return None
    return control_plane_or_exit(launch, getattr(executor_class, "control_backend", None) or None)


def control_plane_or_exit(launch: LaunchInfo, backend: str | None = None) -> ControlPlane:
    """The job's control plane; a launcher/MPI mismatch is reported once and exits 1."""
    try:
        return get_control_plane(launch, backend)
    except LaunchError as exc:
        if launch.rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FATAL) from None


def run_spmd(
    launch: LaunchInfo,
    prepare: Callable[[], OmniDiffusionConfig | None],
    job: Callable[[DiffusionEngine], int],
    usage_errors: tuple[type[BaseException], ...] = (),
    backend: str | None = None,
) -> int:
    """Run ``job`` on rank 0's engine; other ranks serve it. Returns this rank's exit code.

    ``backend`` (``mpi``/``torch``) overrides the launcher's control plane; every rank must
    pass the same (it comes from the command line, which every rank parses).
    ``prepare`` runs on rank 0 only (read inputs, build the config); None means there is
    nothing to do: every rank exits 0 without loading anything. Any exception on rank 0
    before the engine holds the other ranks releases them: with exit 2 for ``usage_errors``
    (nothing was loaded anywhere), 1 for anything else. After that, closing the engine
    releases them (or ends the whole job if it failed).
    """
    control = control_plane_or_exit(launch, backend) if launch.is_distributed else None
    code = serve_unless_rank0(control)
    if code is not None:
        return code
    try:
        od_config = prepare()
        if od_config is None:
            release_waiting_ranks(control, EXIT_OK)
            return EXIT_OK
        engine = DiffusionEngine(od_config)
    except BaseException as exc:
        release_waiting_ranks(control, EXIT_USAGE if isinstance(exc, usage_errors) else EXIT_FATAL)
        raise
    with engine:
        return job(engine)


def describe_layout(engine: DiffusionEngine) -> dict[str, Any]:
    """World size, this launch, and every rank's health (device, state)."""
    launch = detect_launcher()
    health = engine.collective_rpc("check_health")
    return {
        "launcher": launch.kind,
        "world_size": len(health),
        "executor": type(engine.executor).__name__,
        "ranks": health,
    }
