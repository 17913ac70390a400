"""ParallelLayout: world = dp x cfg x sp x tp (sp = ring x ulysses), rank coordinates, replicas and
their leaders. Shapes and coordinates are in mesh order (dp, cfg, ring, ulysses, tp)."""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import pytest

from spmd_diffusion.parallel import (
    ParallelLayout,
    build_device_mesh,
    is_replica_leader,
    replica_index,
)


def test_dp_is_what_tp_and_cfg_leave():
    layout = ParallelLayout(8, tp=2, cfg=2)
    assert (layout.dp, layout.shape, layout.replica_size) == (2, (2, 2, 1, 1, 2), 4)
    assert ParallelLayout(3).dp == 3
    assert ParallelLayout(4, tp=4).shape == (1, 1, 1, 1, 4)


def test_ranks_are_tp_fastest():
    layout = ParallelLayout(8, tp=2, cfg=2)
    assert [layout.coordinates(rank) for rank in range(4)] == [
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 1),
        (0, 1, 0, 0, 0),
        (0, 1, 0, 0, 1),
    ]
    assert layout.coordinates(5) == (1, 0, 0, 0, 1)
    assert [replica_index(layout, rank) for rank in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [rank for rank in range(8) if is_replica_leader(layout, rank)] == [0, 4]
    assert layout.leader_ranks() == [0, 4]
    assert layout.replica_ranks(1) == [4, 5, 6, 7]


def test_sequence_parallel_ranks_sit_between_cfg_and_tp():
    layout = ParallelLayout(16, tp=2, cfg=2, ulysses=2, ring=2)
    assert (layout.dp, layout.sp, layout.replica_size, layout.shape) == (1, 4, 16, (1, 2, 2, 2, 2))
    assert layout.coordinates(1) == (0, 0, 0, 0, 1) and layout.coordinates(2) == (0, 0, 0, 1, 0)
    assert layout.coordinates(4) == (0, 0, 1, 0, 0) and layout.coordinates(8) == (0, 1, 0, 0, 0)
    assert ParallelLayout(8, ulysses=2, cfg=2).leader_ranks() == [0, 4]
    assert ParallelLayout(4, ring=2).describe() == {
        "world_size": 4,
        "dp": 2,
        "cfg": 1,
        "sp": 2,
        "ulysses": 1,
        "ring": 2,
        "tp": 1,
    }


def test_every_rank_a_leader_without_tp_or_cfg():
    layout = ParallelLayout(3)
    assert [layout.is_replica_leader(rank) for rank in range(3)] == [True, True, True]
    assert [layout.replica_index(rank) for rank in range(3)] == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"world_size": 6, "tp": 4}, r"world_size=6 is not divisible by tp\*cfg=4 \(tp=4, cfg=1\)"),
        (
            {"world_size": 6, "tp": 2, "cfg": 2},
            r"world_size=6 is not divisible by tp\*cfg=4 \(tp=2, cfg=2",
        ),
        ({"world_size": 4, "cfg": 3}, r"cfg must be 1 \(off\) or 2"),
        ({"world_size": 4, "tp": 0}, r"tp must be a positive integer, got 0"),
        ({"world_size": 0}, r"world_size must be a positive integer, got 0"),
        ({"world_size": 2, "tp": 1.5}, r"tp must be a positive integer"),
        (
            {"world_size": 6, "ulysses": 4},
            r"not divisible by tp\*cfg\*ulysses=4 \(tp=1, cfg=1, ulysses=4\)",
        ),
        ({"world_size": 4, "ulysses": 2, "ring": 3}, r"tp\*cfg\*ulysses\*ring=6"),
        ({"world_size": 4, "ring": 0}, r"ring must be a positive integer, got 0"),
    ],
)
def test_invalid_layouts_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ParallelLayout(**kwargs)


def test_rank_and_replica_bounds():
    layout = ParallelLayout(4, tp=2)
    with pytest.raises(ValueError, match="rank 4 is outside the world of 4 ranks"):
        layout.coordinates(4)
    with pytest.raises(ValueError, match="replica 2 is outside the 2 data-parallel replicas"):
        layout.replica_ranks(2)


def test_mesh_needs_the_default_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group is already up in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_device_mesh(ParallelLayout(2, tp=2), "cpu")
