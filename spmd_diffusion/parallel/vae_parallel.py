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
SD 1.x/XL, PixArt, SD3 and Flux. The 3-D causal video VAEs (Wan, Qwen-Image, LTX) and Sana's
DC-AE are refused before loading. A latent whose rows do not split evenly decodes whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol

from spmd_diffusion.parallel.sp_attention import all_gather

SUPPORTED = ("AutoencoderKL",)


def vae_refusal(vae_class: str | None) -> str | None:
    """Why ``--vae-parallel`` cannot split this VAE's decode, or None."""
    if vae_class is None or vae_class in SUPPORTED:
        return None
    return (f"--vae-parallel splits the 2-D KL autoencoder's decode ({', '.join(SUPPORTED)}: SD, SDXL, PixArt, "
            f"SD3, Flux); this pipeline's VAE is {vae_class}")


@dataclass
class VAEState:
    """Whether a split decode is running (the inner hooks act only then) and the counts."""

    group: Any
    rank: int
    size: int
    active: bool = False
    split_decodes: int = 0
    whole_decodes: int = 0

    def describe(self) -> dict[str, Any]:
        return {"ranks": self.size, "split_decodes": self.split_decodes, "whole_decodes": self.whole_decodes}


@dataclass
class VAEReport:
    vae: str
    state: VAEState = field(repr=False)
    convs: int = 0
    norms: int = 0
    attentions: int = 0

    def describe(self) -> dict[str, Any]:
        return {"vae": self.vae, "halo_convs": self.convs, "synced_group_norms": self.norms,
                "gathered_attentions": self.attentions, **self.state.describe()}

    def summary(self) -> str:
        return (f"vae parallel decode over {self.state.size} ranks ({self.vae}): {self.convs} convolutions with halo "
                f"rows, {self.norms} group norms and {self.attentions} attentions over the whole image")


def neighbour_rows(tensor: torch.Tensor, rows: int, state: VAEState) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``rows`` rows just above and below this rank's band (None at the image's edges)."""
    edges = torch.cat([tensor[:, :, :rows], tensor[:, :, -rows:]], dim=2).contiguous()
    gathered = all_gather(edges, 0, state.group).chunk(state.size)
    above = gathered[state.rank - 1][:, :, rows:] if state.rank > 0 else None
    below = gathered[state.rank + 1][:, :, :rows] if state.rank + 1 < state.size else None
    return above, below


def halo_conv(conv: nn.Conv2d, band: torch.Tensor, state: VAEState) -> torch.Tensor:
    """A stride-1 'same' convolution of a band as if the whole image were there: the band is
    convolved as it is (zero rows beyond it), then its first and last ``padding`` output rows
    are recomputed from slabs that include the neighbours' rows. No copy of the band."""
    rows = conv.padding[0]
    out = conv._conv_forward(band, conv.weight, conv.bias)
    above, below = neighbour_rows(band, rows, state)
    side = (0, conv.padding[1])
    if above is not None:
        slab = torch.cat([above, band[:, :, :2 * rows]], dim=2)
        out[:, :, :rows] = F.conv2d(slab, conv.weight, conv.bias, 1, side, conv.dilation, conv.groups)
    if below is not None:
        slab = torch.cat([band[:, :, -2 * rows:], below], dim=2)
        out[:, :, -rows:] = F.conv2d(slab, conv.weight, conv.bias, 1, side, conv.dilation, conv.groups)
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
    normed = F.batch_norm(grouped.unsqueeze(0), global_mean.to(hidden.dtype), global_var.to(hidden.dtype),
                          training=False, eps=norm.eps).reshape(hidden.shape)
    if norm.affine:
        shape = (1, channels) + (1,) * (hidden.dim() - 2)
        normed.mul_(norm.weight.reshape(shape)).add_(norm.bias.reshape(shape))
    return normed


class GatheredAttentionProcessor:
    """The VAE mid-block's self-attention (``AttnProcessor2_0`` on a (B, C, H, W) band, group
    norm, residual): local queries over every band's keys and values."""

    def __init__(self, state: VAEState) -> None:
        self.state = state

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        residual, (batch, channels, height, width) = hidden_states, hidden_states.shape
        hidden = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        if self.state.active:
            key, value = all_gather(key, 1, self.state.group), all_gather(value, 1, self.state.group)
        query, key, value = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _hooks(state: VAEState) -> tuple[type, type, type]:
    from diffusers.hooks import ModelHook

    class SplitRowsHook(ModelHook):
        """On the decoder: take this rank's band of the latent, gather the bands decoded."""

        _is_stateful = False

        def pre_forward(self, module: Any, latent: torch.Tensor, *args: Any, **kwargs: Any):
            rows = latent.shape[2] if latent.dim() == 4 else 0
            state.active = rows % state.size == 0 and rows // state.size >= 2  # a 3x3 halo needs 2 own rows
            if state.active:
                latent = latent.chunk(state.size, dim=2)[state.rank].contiguous()
                state.split_decodes += 1
            else:
                state.whole_decodes += 1
            return (latent, *args), kwargs

        def post_forward(self, module: Any, output: torch.Tensor) -> torch.Tensor:
            if state.active:
                state.active = False
                output = all_gather(output.movedim(2, 0), 0, state.group).movedim(0, 2).contiguous()
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
                return F.group_norm(hidden, module.num_groups, module.weight, module.bias, module.eps)
            return synced_group_norm(module, hidden, state)

    return SplitRowsHook, HaloHook, SyncedNormHook


def enable_vae_parallel(vae: nn.Module, group: Any, rank: int, size: int) -> VAEReport:
    """Split ``vae``'s decodes over ``group`` (the replica's ``size`` ranks), in place; every
    rank of the group must decode the same latents (they do: a replica runs one call)."""
    from diffusers.hooks import HookRegistry

    problem = vae_refusal(type(vae).__name__)
    if problem is not None:
        raise ValueError(problem)
    state = VAEState(group, rank, size)
    report = VAEReport(type(vae).__name__, state)
    split, halo_hook, norm_hook = _hooks(state)
    decoder = vae.decoder
    for module in decoder.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            if module.stride[0] != 1 or module.padding[0] != module.kernel_size[0] // 2:
                raise ValueError(f"--vae-parallel: a decoder convolution with stride {module.stride} and padding "
                                 f"{module.padding} cannot take halo rows")
            HookRegistry.check_if_exists_or_initialize(module).register_hook(halo_hook(), "spmd_vae_halo")
            report.convs += 1
        elif isinstance(module, nn.GroupNorm):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(norm_hook(), "spmd_vae_norm")
            report.norms += 1
        elif hasattr(module, "set_processor") and hasattr(module, "to_q"):
            module.set_processor(GatheredAttentionProcessor(state))
            report.attentions += 1
    HookRegistry.check_if_exists_or_initialize(decoder).register_hook(split(), "spmd_vae_split")
    return report
