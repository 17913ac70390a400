"""VAE parallel decode (``--vae-parallel``): one image's decode split across a replica's ranks.

The decode of a large image is where a replica's memory peaks (the decoder's activations are
the image's size times its channel widths), so each rank decodes a band of rows of the
latent, as xDiT's DistVAE and vLLM-Omni's patch-parallel decode do, and the bands are
gathered at the end. What crosses a band's edge is exchanged so the result is the whole
decode's, not a blend of tiles:

- every 3x3 convolution first receives its neighbours' edge rows (a halo of ``padding``
  rows, zeros at the image's edges) and drops the rows it computed from them;
- every GroupNorm takes its mean and variance over the whole image (sums all-reduced);
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


def halo(tensor: torch.Tensor, rows: int, state: VAEState) -> torch.Tensor:
    """(B, C, h, W) band -> the band with ``rows`` neighbour rows above and below."""
    edges = torch.cat([tensor[:, :, :rows], tensor[:, :, -rows:]], dim=2).contiguous()
    gathered = all_gather(edges, 0, state.group).chunk(state.size)
    zeros = torch.zeros_like(tensor[:, :, :rows])
    above = gathered[state.rank - 1][:, :, rows:] if state.rank > 0 else zeros
    below = gathered[state.rank + 1][:, :, :rows] if state.rank + 1 < state.size else zeros
    return torch.cat([above, tensor, below], dim=2)


def synced_group_norm(norm: nn.GroupNorm, hidden: torch.Tensor, state: VAEState) -> torch.Tensor:
    """GroupNorm with statistics over every band (sums all-reduced in float64)."""
    batch, channels = hidden.shape[:2]
    grouped = hidden.reshape(batch, norm.num_groups, -1).to(torch.float64)
    stats = torch.stack([grouped.sum(-1), grouped.pow(2).sum(-1),
                         torch.full_like(grouped[..., 0], grouped.shape[-1])], dim=0)
    stats = funcol.wait_tensor(funcol.all_reduce(stats, "sum", state.group))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean.pow(2)
    normed = (grouped - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
    normed = normed.to(hidden.dtype).reshape(hidden.shape)
    if norm.affine:
        shape = (1, channels) + (1,) * (hidden.dim() - 2)
        normed = normed * norm.weight.reshape(shape) + norm.bias.reshape(shape)
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
            state.active = latent.dim() == 4 and latent.shape[2] % state.size == 0 and latent.shape[2] >= state.size
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

        def pre_forward(self, module: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any):
            if state.active:
                hidden = halo(hidden, module.padding[0], state)
            return (hidden, *args), kwargs

        def post_forward(self, module: Any, output: torch.Tensor) -> torch.Tensor:
            rows = module.padding[0]
            return output[:, :, rows:-rows] if state.active else output

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
