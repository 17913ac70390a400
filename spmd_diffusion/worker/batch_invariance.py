"""Batch-invariant inference: every forward pass sees the same shape, one sample at a time.

A float result depends on the shapes a kernel runs at (measured here on CPU: the same image
denoised in a batch of 1, 4 or 8 differs by ~3e-6, enough to flip PNG pixels), but, for a
fixed shape, not on a sample's position or on its batch mates (measured: bit-identical).
So running the text encoder and the denoiser one sample (row) at a time, and decoding the
VAE one image at a time (diffusers' own ``enable_slicing``), makes an image independent of
how many prompts shared its pipeline call: ``--batch-size`` no longer changes any pixel.
It costs throughput where batching helped (small models, small images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def _rows(value: Any, batch: int, index: int) -> Any:
    """Row ``index`` of every tensor whose first dimension is the batch; the rest as is."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[index : index + 1]
    if isinstance(value, dict):
        return {key: _rows(item, batch, index) for key, item in value.items()}
    if (
        isinstance(value, (list, tuple))
        and value
        and any(isinstance(v, torch.Tensor) for v in value)
    ):
        return type(value)(_rows(item, batch, index) for item in value)
    return value


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _concat(outputs: list[Any]) -> Any:
    """Stack per-row outputs back into the structure the module returns."""
    import torch

    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=0)
    if isinstance(first, tuple) and not hasattr(first, "_fields"):
        return tuple(_concat([output[i] for output in outputs]) for i in range(len(first)))
    if dataclasses.is_dataclass(first):
        merged = {}
        for field in dataclasses.fields(first):
            values = [getattr(output, field.name) for output in outputs]
            merged[field.name] = _concat(values) if values[0] is not None else None
        return type(first)(**merged)
    return first  # non-tensor outputs are the same for every row


def row_by_row(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a module's forward so a batch of N runs as N forwards of one row each."""

    def batch_invariant_forward(*args: Any, **kwargs: Any) -> Any:
        batch = _batch_of(args, kwargs)
        if batch is None or batch == 1:
            return forward(*args, **kwargs)
        outputs = [
            forward(*_rows(args, batch, index), **_rows(kwargs, batch, index))
            for index in range(batch)
        ]
        return _concat(outputs)

    batch_invariant_forward.row_by_row = True  # type: ignore[attr-defined]
    return batch_invariant_forward


def make_batch_invariant(pipeline: Any) -> list[str]:
    """Make a loaded pipeline batch-invariant in place; returns what was changed."""
    changed = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer"):
        module = getattr(pipeline, name, None)
        if module is not None and not getattr(module.forward, "row_by_row", False):
            module.forward = row_by_row(module.forward)
            changed.append(name)
    vae = getattr(pipeline, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        changed.append("vae (slicing)")
    return changed
