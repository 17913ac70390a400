"""VAE parallel decode (``--vae-parallel``): one image's decode split across a replica's ranks.

The decode of a large image is where a replica's memory peaks (the decoder's activations are
the image's size times its channel widths), so each rank decodes a band of rows of the
latent, as xDiT's DistVAE and vLLM-Omni's patch-parallel decode do, and the bands are
gathered at the end. What crosses a band's edge is exchanged so the result is the whole
decode's, not a blend of tiles:

- every 3x3 convolution recomputes its band's first and last rows from its neighbours' edge
  rows (a halo of ``padding`` rows, zeros at the image's edges);
- every GroupNorm takes its mean and variance over the whole image (per-band statistics
  combined across the ranks);
- the mid-block's self-attention lets each band's queries see every band's keys and values
  (all-gathered).

Upsampling (nearest) and 1x1 convolutions need nothing. Supported: the 2-D KL autoencoder of
SD 1.x/XL, PixArt, SD3 and Flux, and the causal 3-D VAE of Wan and Qwen-Image, which decodes a
video frame by frame with a cache of each convolution's last input frames: its causal
convolutions take the neighbours' rows of the cached and the new frames alike, its RMS norms
are per position (nothing to share) and its per-frame attention gathers keys and values.
LTX's video VAE and Sana's DC-AE are refused before loading. A latent whose rows do not
split evenly (at least two per rank) decodes whole.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers)

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spmd_diffusion.parallel.sp_attention import all_gather

SUPPORTED = ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLQwenImage")


def vae_refusal(vae_class: str | None) -> str | None:
    """Why ``--vae-parallel`` cannot split this VAE's decode, or None."""
    if vae_class is None or vae_class in SUPPORTED:
        return None
    return (
        "--vae-parallel splits the decode of the KL autoencoder "
        "(SD, SDXL, PixArt, SD3, Flux) and of the "
        f"causal 3-D VAE of Wan and Qwen-Image ({', '.join(SUPPORTED)}); "
        f"this pipeline's VAE is {vae_class}"
    )


@dataclass
class VAEState:
    """Whether a split decode is running (the inner hooks act only then) and the counts of
    decoder calls split or whole (an image decodes in one call, a video in one per latent frame)."""

    group: Any
    rank: int
    size: int
    active: bool = False
    split_decoder_calls: int = 0
    whole_decoder_calls: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "ranks": self.size,
            "split_decoder_calls": self.split_decoder_calls,
            "whole_decoder_calls": self.whole_decoder_calls,
        }


@dataclass
class VAEReport:
    vae: str
    state: VAEState = field(repr=False)
    convs: int = 0
    norms: int = 0
    attentions: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "halo_convs": self.convs,
            "synced_group_norms": self.norms,
            "gathered_attentions": self.attentions,
            **self.state.describe(),
        }

    def summary(self) -> str:
        return (
            f"vae parallel decode over {self.state.size} ranks ({self.vae}): "
            f"{self.convs} convolutions with halo rows, {self.norms} group norms "
            f"and {self.attentions} attentions over the whole image"
        )


def neighbour_rows(
    tensor: torch.Tensor, rows: int, state: VAEState, dim: int = 2
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``rows`` rows (along ``dim``) just above and below this rank's band (None at the
    image's edges)."""
    edges = torch.cat(
        [tensor.narrow(dim, 0, rows), tensor.narrow(dim, tensor.shape[dim] - rows, rows)], dim=dim
    )
    gathered = all_gather(edges.contiguous(), 0, state.group).chunk(state.size)
    above = gathered[state.rank - 1].narrow(dim, rows, rows) if state.rank > 0 else None
    below = gathered[state.rank + 1].narrow(dim, 0, rows) if state.rank + 1 < state.size else None
    return above, below


def causal_conv(
    conv: nn.Conv3d, frames: torch.Tensor, cache: torch.Tensor | None, state: VAEState
) -> torch.Tensor:
    """A causal 3-D convolution of the Wan/Qwen-Image VAE (``_padding``: width, height, time
    front/back; earlier frames from ``cache``) on a band of rows: the band's rows are padded
    with the neighbours' rows of the cached and new frames instead of zeros."""
    padding = list(conv._padding)
    if cache is not None and padding[4] > 0:
        frames = torch.cat([cache.to(frames.device), frames], dim=2)
        padding[4] -= cache.shape[2]
    rows = padding[2]
    if state.active and rows:
        above, below = neighbour_rows(frames, rows, state, dim=3)
        zeros = torch.zeros_like(frames.narrow(3, 0, rows))
        frames = torch.cat(
            [zeros if above is None else above, frames, zeros if below is None else below], dim=3
        )
        padding[2] = padding[3] = 0
    return nn.Conv3d.forward(conv, F.pad(frames, padding))


def frame_attention(block: nn.Module, x: torch.Tensor, state: VAEState) -> torch.Tensor:
    """The Wan/Qwen-Image VAE's single-head attention over each frame's pixels, with every
    band's keys and values."""
    identity, (batch, channels, time, height, width) = x, x.shape
    x = block.norm(x.permute(0, 2, 1, 3, 4).reshape(batch * time, channels, height, width))
    qkv = (
        block.to_qkv(x).reshape(batch * time, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
    )
    q, k, v = qkv.chunk(3, dim=-1)
    if state.active:
        k, v = (
            all_gather(k.contiguous(), 2, state.group),
            all_gather(v.contiguous(), 2, state.group),
        )
    x = (
        F.scaled_dot_product_attention(q, k, v)
        .squeeze(1)
        .permute(0, 2, 1)
        .reshape(batch * time, channels, height, width)
    )
    x = block.proj(x).view(batch, time, channels, height, width).permute(0, 2, 1, 3, 4)
    return x + identity


def halo_conv(conv: nn.Conv2d, band: torch.Tensor, state: VAEState) -> torch.Tensor:
    """A stride-1 'same' convolution of a band as if the whole image were there: the band is
    convolved as it is (zero rows beyond it), then its first and last ``padding`` output rows
    are recomputed from slabs that include the neighbours' rows. No copy of the band."""
    rows = conv.padding[0]
    out = conv._conv_forward(band, conv.weight, conv.bias)
    above, below = neighbour_rows(band, rows, state)
    side = (0, conv.padding[1])
    if above is not None:
        slab = torch.cat([above, band[:, :, : 2 * rows]], dim=2)
        out[:, :, :rows] = F.conv2d(
            slab, conv.weight, conv.bias, 1, side, conv.dilation, conv.groups
        )
    if below is not None:
        slab = torch.cat([band[:, :, -2 * rows :], below], dim=2)
        out[:, :, -rows:] = F.conv2d(
            slab, conv.weight, conv.bias, 1, side, conv.dilation, conv.groups
        )
    return out


def synced_group_norm(norm: nn.GroupNorm, hidden: torch.Tensor, state: VAEState) -> torch.Tensor:
    """GroupNorm with statistics over every band: each band's per-group mean and variance
    (fp32, no copy of the band) combined across ranks in float64 (Chan's formula), then one
    fused normalisation (``F.batch_norm`` over batch x group channels) and the affine in place."""
    batch, channels = hidden.shape[:2]
    grouped = hidden.reshape(batch * norm.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=1, correction=0)
    count = torch.full_like(mean, grouped.shape[1])
    local = torch.stack([mean, var, count]).to(torch.float64)
    parts = all_gather(local.unsqueeze(0), 0, state.group)  # (ranks, 3, B*G)
    means, variances, counts = parts[:, 0], parts[:, 1], parts[:, 2]
    total = counts.sum(0)
    global_mean = (means * counts).sum(0) / total
    global_var = ((variances + (means - global_mean).pow(2)) * counts).sum(0) / total
    normed = F.batch_norm(
        grouped.unsqueeze(0),
        global_mean.to(hidden.dtype),
        global_var.to(hidden.dtype),
        training=False,
        eps=norm.eps,
    ).reshape(hidden.shape)
    if norm.affine:
        shape = (1, channels) + (1,) * (hidden.dim() - 2)
        normed.mul_(norm.weight.reshape(shape)).add_(norm.bias.reshape(shape))
    return normed


class GatheredAttentionProcessor:
    """The VAE mid-block's self-attention (``AttnProcessor2_0`` on a (B, C, H, W) band, group
    norm, residual): local queries over every band's keys and values."""

    def __init__(self, state: VAEState) -> None:
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        temb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual, (batch, channels, height, width) = hidden_states, hidden_states.shape
        hidden = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        if self.state.active:
            key, value = (
                all_gather(key, 1, self.state.group),
                all_gather(value, 1, self.state.group),
            )
        query, key, value = (
            x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value)
        )
        out = (
            F.scaled_dot_product_attention(query, key, value)
            .transpose(1, 2)
            .flatten(2)
            .to(query.dtype)
        )
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _hooks(state: VAEState) -> tuple[type, ...]:
    from diffusers.hooks import ModelHook

    class SplitRowsHook(ModelHook):
        """On the decoder: take this rank's band of the latent's rows (the last but one
        dimension: images and video frames alike), gather the bands decoded."""

        _is_stateful = False

        def pre_forward(self, module: Any, latent: torch.Tensor, *args: Any, **kwargs: Any):
            rows = latent.shape[-2] if latent.dim() >= 4 else 0
            state.active = (
                rows % state.size == 0 and rows // state.size >= 2
            )  # a 3x3 halo needs 2 own rows
            if state.active:
                latent = latent.chunk(state.size, dim=-2)[state.rank].contiguous()
                state.split_decoder_calls += 1
            else:
                state.whole_decoder_calls += 1
            return (latent, *args), kwargs

        def post_forward(self, module: Any, output: torch.Tensor) -> torch.Tensor:
            if state.active:
                state.active = False
                output = (
                    all_gather(output.movedim(-2, 0), 0, state.group).movedim(0, -2).contiguous()
                )
            return output

    class HaloHook(ModelHook):
        _is_stateful = False

        def new_forward(self, module: Any, hidden: torch.Tensor) -> torch.Tensor:
            if not state.active:
                return module._conv_forward(hidden, module.weight, module.bias)
            return halo_conv(module, hidden, state)

    class SyncedNormHook(ModelHook):
        _is_stateful = False

        def new_forward(self, module: Any, hidden: torch.Tensor) -> torch.Tensor:
            if not state.active:
                return F.group_norm(
                    hidden, module.num_groups, module.weight, module.bias, module.eps
                )
            return synced_group_norm(module, hidden, state)

    class CausalConvHook(ModelHook):
        _is_stateful = False

        def new_forward(
            self, module: Any, frames: torch.Tensor, cache_x: torch.Tensor | None = None
        ) -> torch.Tensor:
            return causal_conv(module, frames, cache_x, state)

    class FrameAttentionHook(ModelHook):
        _is_stateful = False

        def new_forward(self, module: Any, x: torch.Tensor) -> torch.Tensor:
            return frame_attention(module, x, state)

    return SplitRowsHook, HaloHook, SyncedNormHook, CausalConvHook, FrameAttentionHook


def enable_vae_parallel(vae: nn.Module, group: Any, rank: int, size: int) -> VAEReport:
    """Split ``vae``'s decodes over ``group`` (the replica's ``size`` ranks), in place; every
    rank of the group must decode the same latents (they do: a replica runs one call)."""
    from diffusers.hooks import HookRegistry

    problem = vae_refusal(type(vae).__name__)
    if problem is not None:
        raise ValueError(problem)
    state = VAEState(group, rank, size)
    report = VAEReport(type(vae).__name__, state)
    split, halo_hook, norm_hook, causal_hook, attention_hook = _hooks(state)
    decoder = vae.decoder
    for module in decoder.modules():
        registry = None
        if (
            type(module).__name__.endswith("CausalConv3d")
            and len(getattr(module, "_padding", ())) == 6
        ):
            if module.stride != (1, 1, 1):
                raise ValueError(
                    f"--vae-parallel: a decoder convolution with stride {module.stride} "
                    "cannot take halo rows"
                )
            registry, hook, name = (
                HookRegistry.check_if_exists_or_initialize(module),
                causal_hook(),
                "spmd_vae_halo",
            )
            report.convs += 1
        elif isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            if module.stride[0] != 1 or module.padding[0] != module.kernel_size[0] // 2:
                raise ValueError(
                    f"--vae-parallel: a decoder convolution with stride {module.stride} "
                    f"and padding {module.padding} cannot take halo rows"
                )
            registry, hook, name = (
                HookRegistry.check_if_exists_or_initialize(module),
                halo_hook(),
                "spmd_vae_halo",
            )
            report.convs += 1
        elif isinstance(module, nn.GroupNorm):
            registry, hook, name = (
                HookRegistry.check_if_exists_or_initialize(module),
                norm_hook(),
                "spmd_vae_norm",
            )
            report.norms += 1
        elif type(module).__name__.endswith("AttentionBlock") and hasattr(module, "to_qkv"):
            registry, hook, name = (
                HookRegistry.check_if_exists_or_initialize(module),
                attention_hook(),
                "spmd_vae_attn",
            )
            report.attentions += 1
        elif hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(GatheredAttentionProcessor(state))
            report.attentions += 1
        if registry is not None:
            registry.register_hook(hook, name)
    HookRegistry.check_if_exists_or_initialize(decoder).register_hook(split(), "spmd_vae_split")
    return report
