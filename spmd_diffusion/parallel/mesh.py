"""The parallel layout of a job: world = dp x cfg x sp x tp (sp = ring x ulysses), and the
device mesh built from it.

Ranks are numbered tp-fastest, then ulysses, ring, cfg, dp::

    rank = (((d * cfg + c) * ring + r) * ulysses + u) * tp + t

(d, c, r, u, t: the rank's index along each dimension). So the ranks of one tensor-parallel
group are neighbours (the same node, NVLink, for any sensible launch), the Ulysses all-to-all
runs between near neighbours next, and one data-parallel replica (the cfg x sp x tp ranks that
make one image together) is a contiguous block of ranks.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

from spmd_diffusion.layout import (  # noqa: F401 - re-exported: the mesh module's names
    CFG_SIZES,
    MESH_DIM_NAMES,
    ParallelLayout,
    is_replica_leader,
    replica_index,
)


def build_device_mesh(layout: ParallelLayout, device_type: str) -> DeviceMesh:
    """The ("dp", "cfg", "ring", "ulysses", "tp") mesh of ``layout``; build it once per job.

    It is a collective over the whole world (it creates the process group of every mesh
    dimension), so every rank must call it, in the same order relative to other collectives.
    The default process group must already be initialised (gloo on CPU; NCCL, or
    ``cpu:gloo,cuda:nccl``, on GPU) with ``world_size`` ranks; on GPU the current CUDA
    device must already be set.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "build_device_mesh needs torch.distributed's default process group: call "
            "torch.distributed.init_process_group first (gloo on CPU, nccl on GPU)"
        )
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"layout.world_size={layout.world_size} but the default process group has {world} ranks"
        )
    return init_device_mesh(device_type, layout.shape, mesh_dim_names=MESH_DIM_NAMES)


def check_mesh(layout: ParallelLayout, mesh: DeviceMesh) -> None:
    """Raise ValueError when ``mesh`` was not built from ``layout`` by :func:`build_device_mesh`."""
    names = tuple(mesh.mesh_dim_names or ())
    if names != MESH_DIM_NAMES or tuple(mesh.shape) != layout.shape:
        raise ValueError(
            f"mesh {names or 'without names'} of shape {tuple(mesh.shape)} "
            f"does not match the layout: expected dims {MESH_DIM_NAMES} "
            f"of shape {layout.shape}; build it with build_device_mesh"
        )
