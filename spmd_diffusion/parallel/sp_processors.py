"""Sequence-parallel attention processors and hooks for the families diffusers gives no
context-parallel plan (SD3/SD3.5, PixArt, Sana) or whose plan does not fit every layout
(Qwen-Image splits its masked, variable-length text, which ring attention cannot mask).

Each processor does what the model's own processor does -- the same projections, norms,
rotary embedding and output projections -- except that the attention runs over the whole
image sequence while each rank holds a shard of it (:func:`.sp_attention.joint_attention`).
Text stays whole on every rank. Each call bumps ``counter.calls`` so the report can say how
many attention calls ran sequence-parallel.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers)

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

from spmd_diffusion.parallel.sp_attention import SequenceGroups, all_gather, joint_attention


@dataclass
class CallCounter:
    calls: int = 0


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads * dim) -> (B, S, heads, dim)."""
    return tensor.unflatten(-1, (heads, -1))


class JointProcessor:
    """SD3/SD3.5 joint attention (``JointAttnProcessor2_0``): image + optional text stream."""

    def __init__(self, groups: SequenceGroups, counter: CallCounter) -> None:
        self.groups, self.counter = groups, counter

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if attention_mask is not None:
            raise ValueError("sequence-parallel joint attention takes no attention mask")
        self.counter.calls += 1
        image = [
            _heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v)
        ]
        image[0], image[1] = _norm(attn.norm_q, image[0]), _norm(attn.norm_k, image[1])
        text = None
        if encoder_hidden_states is not None:
            text = [
                _heads(proj(encoder_hidden_states), attn.heads)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            text[0], text[1] = _norm(attn.norm_added_q, text[0]), _norm(attn.norm_added_k, text[1])
        image_out, text_out = joint_attention(
            tuple(image), tuple(text) if text else None, self.groups
        )
        hidden_states = attn.to_out[1](attn.to_out[0](image_out.flatten(2)))
        if text_out is None:
            return hidden_states
        text_out = text_out.flatten(2)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return hidden_states, text_out


class QwenJointProcessor:
    """Qwen-Image double-stream attention (``QwenDoubleStreamAttnProcessor2_0``), with its
    rotary embedding and the prompt mask applied to the (whole) text keys."""

    def __init__(self, groups: SequenceGroups, counter: CallCounter) -> None:
        self.groups, self.counter = groups, counter

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError(
                "Qwen-Image attention needs the text stream and takes no external attention mask"
            )
        self.counter.calls += 1
        head_dim = attn.inner_dim // attn.heads
        image = [
            proj(hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        ]
        text = [
            proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        image[0], image[1] = _norm(attn.norm_q, image[0]), _norm(attn.norm_k, image[1])
        text[0], text[1] = _norm(attn.norm_added_q, text[0]), _norm(attn.norm_added_k, text[1])
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            for pos in (0, 1):
                image[pos] = apply_rotary_emb_qwen(image[pos], image_freqs, use_real=False)
                text[pos] = apply_rotary_emb_qwen(text[pos], text_freqs, use_real=False)
        image_out, text_out = joint_attention(
            tuple(image), tuple(text), self.groups, text_mask=encoder_hidden_states_mask
        )
        image_out = attn.to_out[0](image_out.flatten(2).contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.flatten(2).contiguous())


class SelfAttentionProcessor:
    """Plain self-attention (PixArt's ``attn1``, ``AttnProcessor2_0`` without group/spatial
    norm)."""

    def __init__(self, groups: SequenceGroups, counter: CallCounter) -> None:
        self.groups, self.counter = groups, counter

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("sequence-parallel self-attention takes no context and no mask")
        self.counter.calls += 1
        image = [
            _heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v)
        ]
        image[0], image[1] = _norm(attn.norm_q, image[0]), _norm(attn.norm_k, image[1])
        out, _ = joint_attention(tuple(image), None, self.groups)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2).to(hidden_states.dtype)))
        return out / attn.rescale_output_factor


class LinearAttentionProcessor:
    """Sana's linear attention (``SanaLinearAttnProcessor2_0``): the key-value sums over the
    sequence are all-reduced over the sequence ranks, then applied to the local queries --
    exact, whatever the split (Ulysses and ring degrees both just shard the tokens)."""

    def __init__(self, groups: SequenceGroups, counter: CallCounter) -> None:
        self.groups, self.counter = groups, counter

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("sequence-parallel linear attention is self-attention only")
        self.counter.calls += 1
        dtype = hidden_states.dtype
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        scores = funcol.wait_tensor(
            funcol.all_reduce(torch.matmul(value, key), "sum", self.groups.flat)
        )
        out = torch.matmul(scores, query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = attn.to_out[1](attn.to_out[0](out.flatten(1, 2).transpose(1, 2).to(dtype)))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out


def _norm(norm: Any, tensor: torch.Tensor) -> torch.Tensor:
    return tensor if norm is None else norm(tensor)


def halo_rows(tensor: torch.Tensor, groups: SequenceGroups) -> torch.Tensor:
    """(B, C, rows, W) band of an image split by rows over the sequence ranks -> the band
    with one neighbour row above and below (zeros at the image's edges), for a 3x3 conv."""
    edges = torch.cat([tensor[:, :, :1], tensor[:, :, -1:]], dim=2).contiguous()
    gathered = all_gather(edges, 0, groups.flat).chunk(groups.flat_size)
    rank, zeros = groups.flat_rank, torch.zeros_like(tensor[:, :, :1])
    above = gathered[rank - 1][:, :, 1:2] if rank > 0 else zeros
    below = gathered[rank + 1][:, :, 0:1] if rank + 1 < groups.flat_size else zeros
    return torch.cat([above, tensor, below], dim=2)


def make_hooks(groups: SequenceGroups) -> tuple[Any, Any]:
    """The two diffusers hooks Sana's blocks need with their tokens split by rows: the block
    is told its local height (it folds tokens back into an image for GLUMBConv), and the
    depthwise 3x3 conv of GLUMBConv sees one halo row from each neighbour."""
    from diffusers.hooks import ModelHook

    class LocalHeightHook(ModelHook):
        _is_stateful = False

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any):
            args = list(args)
            if "height" in kwargs:
                kwargs["height"] = _local_rows(kwargs["height"], groups)
            elif len(args) > 5:
                args[5] = _local_rows(args[5], groups)
            return tuple(args), kwargs

    class HaloConvHook(ModelHook):
        _is_stateful = False

        def pre_forward(self, module: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            return (halo_rows(hidden_states, groups), *args), kwargs

        def post_forward(self, module: Any, output: torch.Tensor) -> torch.Tensor:
            return output[:, :, 1:-1]

    return LocalHeightHook, HaloConvHook


def _local_rows(height: int, groups: SequenceGroups) -> int:
    if height % groups.flat_size:
        raise ValueError(
            f"the latent image has {height} rows of tokens, which do not split evenly over "
            f"{groups.flat_size} sequence-parallel ranks"
        )
    return height // groups.flat_size
