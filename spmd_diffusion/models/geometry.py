"""How many tokens a family's denoiser sees for an image of a given size, known before loading
(from the VAE's and the denoiser's config.json): sequence parallelism splits those tokens, so
a size whose tokens do not split evenly over the ranks is refused with the item's file:line
instead of failing after loading."""

# ruff: noqa: PLC0415 - project modules load where used (models.loader): they pull in heavy modules
# or import back into this one

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

# Pipelines that pack 2x2 latent patches into one token themselves (the transformer's own
# patch_size is 1 for Flux, 2 for Qwen-Image, where the pipeline does the packing).
PACKED = {
    "FluxTransformer2DModel": 2,
    "Flux2Transformer2DModel": 2,
    "QwenImageTransformer2DModel": 2,
}
BY_ROWS = (
    "SanaTransformer2DModel",
)  # convolutions over the token image: the split falls between rows


@dataclass(frozen=True)
class TokenGrid:
    """``scale``: image pixels per token side; ``by_rows``: the split must fall between rows."""

    scale: int
    by_rows: bool = False

    def problem(self, height: int, width: int, ranks: int) -> str | None:
        """Why an image of this size cannot be split over ``ranks`` sequence ranks, or None."""
        rows, cols = height // self.scale, width // self.scale
        if self.by_rows and rows % ranks:
            return (
                f"a {width}x{height} image is {rows} rows of tokens, which do not split evenly "
                f"over {ranks} sequence-parallel ranks; use a height that is a multiple of "
                f"{self.scale * ranks}"
            )
        if not self.by_rows and (rows * cols) % ranks:
            step = self.scale * ranks
            return (
                f"a {width}x{height} image is {rows}x{cols} = {rows * cols} tokens, which do not "
                f"split evenly over {ranks} sequence-parallel ranks; use a height or width that "
                f"is a multiple of {step}"
            )
        return None


def vae_scale(vae: str, config: dict[str, Any]) -> int | None:
    """Pixels per latent side of a VAE class and config."""
    if vae == "AutoencoderKL" and config.get("block_out_channels"):
        return 2 ** (len(config["block_out_channels"]) - 1)
    if vae == "AutoencoderDC" and config.get("encoder_block_out_channels"):
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)
    if vae in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
        return config.get("scale_factor_spatial") or 2 ** len(
            config.get("temperal_downsample") or ()
        )
    if vae == "AutoencoderKLLTXVideo":
        return int(config.get("patch_size") or 1) * 2 ** sum(
            bool(x) for x in config.get("spatio_temporal_scaling") or ()
        )
    return None


@functools.lru_cache(maxsize=16)
def token_grid(model: str) -> TokenGrid | None:
    """The model's token grid, or None where it cannot be known before loading (a hub id,
    an unknown VAE)."""
    from spmd_diffusion.models.loader import component_config

    vae, denoiser = component_config(model, "vae"), component_config(model, "transformer")
    if vae is None or denoiser is None:
        return None
    scale = vae_scale(*vae)
    name, config = denoiser
    patch = config.get("patch_size") or 1
    patch = PACKED.get(name, patch[-1] if isinstance(patch, (list, tuple)) else patch)
    if not scale or not isinstance(patch, int):
        return None
    return TokenGrid(scale * patch, by_rows=name in BY_ROWS)


def default_size(model: str) -> tuple[int | None, int | None]:
    """(height, width) an item without its own runs with, where the tool knows it before
    loading: the model's call defaults (the tiny models carry them)."""
    from spmd_diffusion.models.loader import model_call_defaults

    defaults = model_call_defaults(model)
    return defaults.get("height"), defaults.get("width")
