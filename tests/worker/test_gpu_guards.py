"""GPU-only failure paths, checked on the CPU by faking what CUDA reports."""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import click
import pytest

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.entrypoints.cli import check_world_layout
from spmd_diffusion.worker.device import check_one_gpu_per_rank


@pytest.fixture
def one_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("flags", [{"tensor_parallel_size": 2}, {"cfg_parallel": True}])
def test_parallel_ranks_sharing_one_gpu_are_refused_before_loading(one_gpu, flags):
    config = OmniDiffusionConfig(executor_class="mp", num_gpus=2, **flags)
    with pytest.raises(
        click.UsageError, match="one GPU per rank, but 2 ranks on this node share 1 GPU"
    ):
        check_world_layout(config)


def test_cpu_runs_and_plain_data_parallel_are_not_refused(one_gpu):
    check_world_layout(
        OmniDiffusionConfig(executor_class="mp", num_gpus=2, tensor_parallel_size=2, device="cpu")
    )
    check_world_layout(
        OmniDiffusionConfig(executor_class="mp", num_gpus=2)
    )  # two replicas may share a GPU


def test_worker_side_guard_names_the_fix():
    check_one_gpu_per_rank(2, 2)
    with pytest.raises(ValueError, match="use --device cpu"):
        check_one_gpu_per_rank(2, 1)
