"""Batch-invariant inference: every forward pass sees the same shape, one sample at a time.

A float result depends on the shapes a kernel runs at (the same image denoised in a batch of
1, 4 or 8 differs in the last float bits, enough to flip PNG pixels), but, for a fixed
shape, not on a sample's position or on its batch mates (bit-identical; both in
benchmarks/RESULTS.md, "Measurements behind design choices").
So running the text encoder and the denoiser one sample (row) at a time, and decoding the
VAE one image at a time (diffusers' own ``enable_slicing``), makes an image independent of
how many prompts shared its pipeline call: ``--batch-size`` no longer changes any pixel.
It costs throughput where batching helped (small models, small images).

The row loop is a diffusers hook (:mod:`spmd_diffusion.models.hooks`) on each module; the
tensors inside arguments and outputs are found with torch's pytree.
"""

# ruff: noqa: PLC0415 - torch is imported on first use: importing this module stays light

from __future__ import annotations

from typing import Any

from spmd_diffusion.models.hooks import hook_owner, wrap_forward

HOOK = "spmd_batch_invariant"
MODULES = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")


def _batch_of(args: tuple, kwargs: dict) -> int | None:
    """The batch size: the first dimension of the first tensor argument."""
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _concat(outputs: list[Any]) -> Any:
    """Per-row outputs joined into the structure the module returns: tensors concatenated
    along the batch, any other leaf (the same for every row) taken from the first."""
    import torch
    from torch.utils import _pytree as pytree

    flat = [pytree.tree_flatten(output) for output in outputs]
    leaves = [
        torch.cat(column, dim=0) if isinstance(column[0], torch.Tensor) else column[0]
        for column in zip(*(leaves for leaves, _ in flat), strict=True)
    ]
    return pytree.tree_unflatten(leaves, flat[0][1])


class RowByRow:
    """Runs a batch of N as N forwards of one row each."""

    def forward(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils import _pytree as pytree

        batch = _batch_of(args, kwargs)
        if batch is None or batch == 1:
            return inner(*args, **kwargs)

        def row(index: int) -> Any:
            def take(tensor: torch.Tensor) -> torch.Tensor:
                if tensor.dim() > 0 and tensor.shape[0] == batch:
                    return tensor[index : index + 1]
                return tensor

            return pytree.tree_map_only(torch.Tensor, take, (args, kwargs))

        return _concat([inner(*rows[0], **rows[1]) for rows in map(row, range(batch))])


def make_batch_invariant(pipeline: Any) -> list[str]:
    """Make a loaded pipeline batch-invariant in place; returns what was changed."""
    changed = []
    for name in MODULES:
        module = getattr(pipeline, name, None)
        if module is not None and hook_owner(module, HOOK) is None:
            wrap_forward(module, HOOK, RowByRow())
            changed.append(name)
    vae = getattr(pipeline, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        changed.append("vae (slicing)")
    return changed
