"""Joining the tensor/CFG-parallel process groups for one worker.

A replica is ``tp x cfg`` consecutive ranks (tp fastest). Their denoiser collectives run on
torch.distributed: NCCL on GPUs, gloo on CPUs. Under torchrun the default group already
exists; under MPI or the ``mp`` executor it is created here from the job's rendezvous store
(:mod:`spmd_diffusion.distributed.rendezvous`), so no MASTER_ADDR/MASTER_PORT is needed. The
device mesh is built once, by every rank.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch); project modules load where used
# (parallel): they pull in heavy modules or import back into this one

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.data import OmniDiffusionConfig

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    layout: Any  # spmd_diffusion.parallel.ParallelLayout
    mesh: Any  # torch DeviceMesh ("dp", "cfg", "tp")


def join_parallel_groups(
    od_config: OmniDiffusionConfig,
    rank: int,
    world_size: int,
    device: Any,
    store: Any | None,
    one_node: bool = False,
) -> ParallelContext | None:
    """The layout and mesh of this job, or None when replicas are single ranks. On one node
    the group's sockets stay on loopback (see :func:`spmd_diffusion.envs.keep_on_loopback`)."""
    if od_config.replica_size == 1:
        return None
    import torch
    import torch.distributed as dist

    from spmd_diffusion.parallel import build_device_mesh

    layout = od_config.parallel_layout(world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if store is None:
            raise RuntimeError(
                "tensor/CFG parallelism needs a rendezvous store or a torch.distributed group"
            )
        envs.keep_on_loopback(one_node)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=od_config.startup_timeout or envs.init_timeout())
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("parallel", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    mesh = build_device_mesh(layout, device.type)
    logger.info("parallel layout dp=%d cfg=%d tp=%d", layout.dp, layout.cfg, layout.tp)
    return ParallelContext(layout, mesh)
