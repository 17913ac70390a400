"""The parallel layout of a job: world = dp x cfg x tp, and the device mesh built from it.

Ranks are numbered tp-fastest: rank = (dp_index * cfg + cfg_index) * tp + tp_index. So the
ranks of one tensor-parallel group are neighbours (the same node, NVLink, for any sensible
launch), and one data-parallel replica (the cfg x tp ranks that make one image together)
is a contiguous block of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIM_NAMES = ("dp", "cfg", "tp")
CFG_SIZES = (1, 2)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelLayout:
    """How ``world_size`` ranks split into replicas (dp), guidance branches (cfg) and shards (tp)."""

    world_size: int
    tp: int = 1
    cfg: int = 1
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        _positive_int("world_size", self.world_size)
        _positive_int("tp", self.tp)
        if self.cfg not in CFG_SIZES or isinstance(self.cfg, bool):
            raise ValueError(f"cfg must be 1 (off) or 2 (guidance branches on two ranks), got {self.cfg!r}")
        per_replica = self.tp * self.cfg
        if self.world_size % per_replica:
            raise ValueError(
                f"world_size={self.world_size} is not divisible by tp*cfg={per_replica} "
                f"(tp={self.tp}, cfg={self.cfg}): every data-parallel replica needs tp*cfg ranks"
            )
        object.__setattr__(self, "dp", self.world_size // per_replica)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The mesh shape, in ``MESH_DIM_NAMES`` order."""
        return (self.dp, self.cfg, self.tp)

    @property
    def replica_size(self) -> int:
        """Ranks that cooperate on one image: cfg x tp."""
        return self.cfg * self.tp

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp index, cfg index, tp index) of a global rank."""
        self._check_rank(rank)
        replica, within = divmod(rank, self.replica_size)
        cfg_index, tp_index = divmod(within, self.tp)
        return (replica, cfg_index, tp_index)

    def replica_index(self, rank: int) -> int:
        """Which data-parallel replica a rank serves: the engine schedules work per replica."""
        return self.coordinates(rank)[0]

    def is_replica_leader(self, rank: int) -> bool:
        """tp rank 0 and cfg rank 0: the one rank of a replica that reports its images
        (every rank of a replica ends with the same images; one answer is enough)."""
        _, cfg_index, tp_index = self.coordinates(rank)
        return cfg_index == 0 and tp_index == 0

    def replica_ranks(self, replica: int) -> list[int]:
        """The global ranks of one replica, leader first."""
        if not 0 <= replica < self.dp:
            raise ValueError(f"replica {replica} is outside the {self.dp} data-parallel replicas")
        start = replica * self.replica_size
        return list(range(start, start + self.replica_size))

    def leader_ranks(self) -> list[int]:
        """The leader of every replica, in replica order."""
        return [replica * self.replica_size for replica in range(self.dp)]


def replica_index(layout: ParallelLayout, rank: int) -> int:
    """Function form of :meth:`ParallelLayout.replica_index`."""
    return layout.replica_index(rank)


def is_replica_leader(layout: ParallelLayout, rank: int) -> bool:
    """Function form of :meth:`ParallelLayout.is_replica_leader`."""
    return layout.is_replica_leader(rank)


def build_device_mesh(layout: ParallelLayout, device_type: str) -> DeviceMesh:
    """The ("dp", "cfg", "tp") mesh of ``layout``; build it once per job.

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
            f"mesh {names or 'without names'} of shape {tuple(mesh.shape)} does not match the layout: "
            f"expected dims {MESH_DIM_NAMES} of shape {layout.shape}; build it with build_device_mesh"
        )
