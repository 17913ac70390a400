"""The parallel layout of a job: world = dp x cfg x sp x tp (sp = ring x ulysses), as pure
arithmetic. Ranks are numbered tp-fastest, then ulysses, ring, cfg, dp::

    rank = (((d * cfg + c) * ring + r) * ulysses + u) * tp + t

(d, c, r, u, t: the rank's index along each dimension). It lives with the config (the base
layer) because the engine needs it before any rank loads torch; the device mesh built from
it is :mod:`spmd_diffusion.parallel.mesh`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MESH_DIM_NAMES = ("dp", "cfg", "ring", "ulysses", "tp")
CFG_SIZES = (1, 2)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ParallelLayout:
    """How ``world_size`` ranks split into replicas (dp), guidance branches (cfg), sequence
    shards (ring x ulysses) and tensor shards (tp)."""

    world_size: int
    tp: int = 1
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        _positive_int("world_size", self.world_size)
        for name in ("tp", "ulysses", "ring"):
            _positive_int(name, getattr(self, name))
        if self.cfg not in CFG_SIZES or isinstance(self.cfg, bool):
            raise ValueError(
                f"cfg must be 1 (off) or 2 (guidance branches on two ranks), got {self.cfg!r}"
            )
        per_replica = self.replica_size
        if self.world_size % per_replica:
            raise ValueError(
                f"world_size={self.world_size} is not divisible by "
                f"{self._product_text()}={per_replica} ({self._factors_text()}): "
                f"every data-parallel replica needs {per_replica} ranks"
            )
        object.__setattr__(self, "dp", self.world_size // per_replica)

    def _product_text(self) -> str:
        sp = "*ulysses" * (self.ulysses > 1) + "*ring" * (self.ring > 1)
        return f"tp*cfg{sp}"

    def _factors_text(self) -> str:
        text = f"tp={self.tp}, cfg={self.cfg}"
        if self.ulysses > 1:
            text += f", ulysses={self.ulysses}"
        if self.ring > 1:
            text += f", ring={self.ring}"
        return text

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ranks that share one image's tokens (ring x ulysses)."""
        return self.ring * self.ulysses

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """The mesh shape, in ``MESH_DIM_NAMES`` order."""
        return (self.dp, self.cfg, self.ring, self.ulysses, self.tp)

    @property
    def replica_size(self) -> int:
        """Ranks that cooperate on one image: cfg x sp x tp."""
        return self.cfg * self.sp * self.tp

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def coordinates(self, rank: int) -> tuple[int, int, int, int, int]:
        """(dp, cfg, ring, ulysses, tp) index of a global rank."""
        self._check_rank(rank)
        indices = []
        for size in reversed(self.shape):
            rank, index = divmod(rank, size)
            indices.append(index)
        return tuple(reversed(indices))  # type: ignore[return-value]

    def replica_index(self, rank: int) -> int:
        """Which data-parallel replica a rank serves: the engine schedules work per replica."""
        return self.coordinates(rank)[0]

    def is_replica_leader(self, rank: int) -> bool:
        """The first rank of its replica: the one rank that reports its images (every rank
        of a replica ends with the same images; one answer is enough)."""
        return rank % self.replica_size == 0 and 0 <= rank < self.world_size

    def replica_ranks(self, replica: int) -> list[int]:
        """The global ranks of one replica, leader first."""
        if not 0 <= replica < self.dp:
            raise ValueError(f"replica {replica} is outside the {self.dp} data-parallel replicas")
        start = replica * self.replica_size
        return list(range(start, start + self.replica_size))

    def leader_ranks(self) -> list[int]:
        """The leader of every replica, in replica order."""
        return [replica * self.replica_size for replica in range(self.dp)]

    def describe(self) -> dict[str, int]:
        """The layout as run.json's ``"parallel"."layout"`` gives it."""
        return {
            "world_size": self.world_size,
            "dp": self.dp,
            "cfg": self.cfg,
            "sp": self.sp,
            "ulysses": self.ulysses,
            "ring": self.ring,
            "tp": self.tp,
        }


def replica_index(layout: ParallelLayout, rank: int) -> int:
    """Function form of :meth:`ParallelLayout.replica_index`."""
    return layout.replica_index(rank)


def is_replica_leader(layout: ParallelLayout, rank: int) -> bool:
    """Function form of :meth:`ParallelLayout.is_replica_leader`."""
    return layout.is_replica_leader(rank)
