"""Device and dtype choice for one rank."""

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
