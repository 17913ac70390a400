"""Device and dtype choice for one rank."""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

from typing import Any


def resolve_device(spec: str, local_rank: int = 0) -> Any:
    """``auto``: GPU ``local_rank % visible GPUs`` when CUDA is usable, else the CPU."""
    import torch

    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda:"):
        return torch.device(spec)
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_dtype(name: str, device: Any) -> Any:
    """``auto``: float16 on GPUs (diffusers' usual choice), float32 on CPUs."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_one_gpu_per_rank(ranks_on_node: int, gpus: int) -> None:
    """Tensor/CFG-parallel ranks need a GPU each: NCCL refuses two ranks on one device
    (found on an H200 run with two ranks sharing cuda:0), and a failed group hangs or fails
    every item. Refuse it up front, with what to do instead."""
    if gpus and ranks_on_node > gpus:
        raise ValueError(
            f"tensor/CFG parallelism needs one GPU per rank, but {ranks_on_node} ranks on this "
            "node share "
            f"{gpus} GPU(s): start at most {gpus} rank(s) per node, or use --device cpu"
        )
