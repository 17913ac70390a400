"""Tensor-parallel and CFG-parallel denoising for diffusers pipelines.

The world splits as dp x cfg x tp (see :mod:`.mesh`): ``dp`` independent replicas, each of
``cfg`` x ``tp`` ranks that make the same images together. Call contract for the worker,
on every rank, in this order::

    from spmd_diffusion.parallel import ParallelLayout, build_device_mesh, parallelize_pipeline

    # once per job, after torch.distributed.init_process_group (gloo on CPU, nccl or
    # "cpu:gloo,cuda:nccl" on GPU) and, on GPU, torch.cuda.set_device(local_rank):
    layout = ParallelLayout(world_size, tp=config.tensor_parallel_size, cfg=2 if config.cfg_parallel else 1)
    mesh = build_device_mesh(layout, device.type)          # collective: every rank calls it

    # after pipeline = load_pipeline(...).to(device)  (weights on their final device):
    report = parallelize_pipeline(pipeline, layout, mesh)   # no collective; logs report.summary()

Every rank must have loaded the same weights: each shards its own copy, nothing is broadcast.

Then every rank of one replica (``layout.replica_ranks(layout.replica_index(rank))``) must
make the same pipeline calls with the same arguments (prompts, seeds, sizes, steps): the
denoiser runs collectives over the tp and cfg groups inside every step. Every rank of the
replica ends with the same images; only the leader (``layout.is_replica_leader(rank)``)
needs to report them. The engine schedules work per replica, not per rank.

Not supported on a parallelized pipeline: moving it to another device (``sleep(1)``'s
``pipeline.to("cpu")``) -- the sharded weights are DTensors bound to the mesh's device --
and reloading it without calling :func:`parallelize_pipeline` again (``sleep(2)``/``wake_up``
must re-run it on the new pipeline, with the same mesh). Count parameter memory with
:func:`param_bytes`: ``numel()`` of a DTensor is its global size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spmd_diffusion.parallel.cfg_parallel import (
    CFGParallel,
    cfg_parallel_of,
    disable_cfg_parallel,
    enable_cfg_parallel,
)
from spmd_diffusion.parallel.mesh import (
    MESH_DIM_NAMES,
    ParallelLayout,
    build_device_mesh,
    check_mesh,
    is_replica_leader,
    replica_index,
)
from spmd_diffusion.parallel.tensor_parallel import (
    TPReport,
    apply_tensor_parallel,
    build_tp_plan,
    gated_row_order,
    param_bytes,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "MESH_DIM_NAMES",
    "CFGParallel",
    "ParallelLayout",
    "ParallelReport",
    "TPReport",
    "apply_tensor_parallel",
    "build_device_mesh",
    "build_tp_plan",
    "cfg_parallel_of",
    "denoiser_of",
    "disable_cfg_parallel",
    "enable_cfg_parallel",
    "gated_row_order",
    "is_replica_leader",
    "parallelize_pipeline",
    "param_bytes",
    "replica_index",
]


@dataclass
class ParallelReport:
    """What :func:`parallelize_pipeline` did to the denoiser of this rank."""

    layout: ParallelLayout
    denoiser: str  # "unet" or "transformer"
    tp: TPReport | None
    cfg: CFGParallel | None

    def summary(self) -> str:
        layout = self.layout
        lines = [f"parallel layout dp={layout.dp} cfg={layout.cfg} tp={layout.tp} (pipeline.{self.denoiser})"]
        if self.tp is not None:
            lines.append(self.tp.summary())
        if self.cfg is not None:
            lines.append("cfg parallel: guided (doubled-batch) steps split over 2 ranks")
        return "\n".join(lines)


def denoiser_of(pipeline: Any) -> tuple[str, Any]:
    """(attribute name, module) of the network that runs every step."""
    for name in ("unet", "transformer"):  # the order DiffusionWorker.denoiser uses
        module = getattr(pipeline, name, None)
        if module is not None:
            return name, module
    raise ValueError(f"{type(pipeline).__name__} has neither a transformer nor a unet to parallelize")


def parallelize_pipeline(pipeline: Any, layout: ParallelLayout, mesh: DeviceMesh) -> ParallelReport:
    """Apply tensor parallelism (tp > 1) and CFG parallelism (cfg == 2) to the pipeline's
    denoiser, in place. ``mesh`` comes from :func:`build_device_mesh` (layout); call it
    after ``pipeline.to(device)``, on every rank. A dp-only layout changes nothing."""
    check_mesh(layout, mesh)
    name, denoiser = denoiser_of(pipeline)
    tp_report = apply_tensor_parallel(denoiser, mesh["tp"]) if layout.tp > 1 else None
    cfg = enable_cfg_parallel(denoiser, mesh["cfg"]) if layout.cfg == 2 else None
    return ParallelReport(layout=layout, denoiser=name, tp=tp_report, cfg=cfg)
