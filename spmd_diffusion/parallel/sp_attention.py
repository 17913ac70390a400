"""Sequence-parallel attention pieces the families need beyond diffusers' templated attention.

- :func:`attention_with_lse`: attention that also returns the log-sum-exp of every query's
  scores, which ring attention merges partial results with. On CPUs diffusers' native backend
  returns none (it refuses ``return_lse``), so :func:`install_native_lse` gives its forward op
  the CPU kernel that does (``_scaled_dot_product_flash_attention_for_cpu``) -- only the call
  diffusers refuses changes; every other call still goes to diffusers' own op.
- :func:`joint_attention`: joint (MMDiT) attention over an image sequence split across the
  sequence-parallel ranks and a text sequence every rank holds whole (SD3's 77 + N CLIP/T5
  tokens and Qwen-Image's variable, masked prompts divide by no degree). Ulysses: the image
  is re-split from tokens to heads by an all-to-all and each rank takes its heads of the text;
  ring: every rank's queries meet each image chunk once and the text once (the chunk-0 pass),
  merged by their log-sum-exp. Exact for any text length, with or without a text mask.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers)

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

# torch >= 2.9 names it all_gather_single (all_gather_tensor is deprecated there).
_ALL_GATHER = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_gather(tensor: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along ``dim``, in group-rank order."""
    return funcol.wait_tensor(_ALL_GATHER(tensor.contiguous(), dim, group))


@dataclass(frozen=True)
class SequenceGroups:
    """The process groups of one replica's sequence-parallel ranks."""

    ulysses: Any  # ProcessGroup of the ulysses dimension
    ulysses_size: int
    ulysses_rank: int
    ring: Any  # ProcessGroup of the ring dimension
    ring_size: int
    ring_rank: int
    flat: Any  # ProcessGroup over ring x ulysses: the order the sequence is split in
    flat_size: int
    flat_rank: int


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for (batch, seq, heads, dim) inputs; lse is (batch, seq, heads)."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~attn_mask, float("-inf")
        )
    if q.device.type == "cuda":
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, True, scale=scale
        )
        lse = lse[..., : q.shape[2]]  # the kernel pads the sequence of its log-sum-exp
    elif q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
        )
    else:
        scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            scores = scores + attn_mask
        lse = torch.logsumexp(scores.float(), dim=-1)
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    return out.transpose(1, 2), lse.transpose(1, 2)


_NATIVE_OP: Any = None


def install_native_lse() -> None:
    """Let diffusers' native attention backend return the log-sum-exp (ring attention on a
    CPU). Idempotent; calls that do not ask for it are passed to diffusers' own op unchanged."""
    global _NATIVE_OP
    from diffusers.models import attention_dispatch

    if _NATIVE_OP is not None:
        return
    _NATIVE_OP = attention_dispatch._native_attention_forward_op

    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if not return_lse or dropout_p or is_causal or enable_gqa:
            return _NATIVE_OP(
                ctx,
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale,
                enable_gqa,
                return_lse,
                _save_ctx,
                _parallel_config,
            )
        return attention_with_lse(query, key, value, scale, attn_mask)

    attention_dispatch._native_attention_forward_op = forward_op


def seq_to_heads(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """(B, S/size, H, D) sequence shards -> (B, S, H/size, D) head shards (all-to-all)."""
    batch, seq, heads, dim = tensor.shape
    chunks = (
        tensor.reshape(batch, seq, size, heads // size, dim).permute(2, 1, 0, 3, 4).contiguous()
    )
    gathered = funcol.wait_tensor(funcol.all_to_all_single(chunks, None, None, group))
    return gathered.reshape(size * seq, batch, heads // size, dim).permute(1, 0, 2, 3)


def heads_to_seq(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """(B, S, H/size, D) head shards -> (B, S/size, H, D) sequence shards (all-to-all)."""
    batch, seq, heads, dim = tensor.shape
    chunks = (
        tensor.reshape(batch, size, seq // size, heads, dim).permute(1, 2, 0, 3, 4).contiguous()
    )
    gathered = funcol.wait_tensor(funcol.all_to_all_single(chunks, None, None, group))
    return gathered.permute(2, 1, 0, 3, 4).reshape(batch, seq // size, size * heads, dim)


def gather_heads(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """(B, S, H/size, D) on every rank -> (B, S, H, D) (all-gather over heads)."""
    return torch.cat(all_gather(tensor, 0, group).chunk(size, dim=0), dim=2)


def _merge(
    out: torch.Tensor,
    lse: torch.Tensor,
    prev_out: torch.Tensor | None,
    prev_lse: torch.Tensor | None,
):
    out, lse = out.float(), lse.float().unsqueeze(-1)
    if prev_out is None:
        return out, lse
    out = prev_out - torch.sigmoid(lse - prev_lse) * (prev_out - out)
    lse = prev_lse - F.logsigmoid(prev_lse - lse)
    return out, lse


def _text_mask(mask: torch.Tensor | None, image_keys: int) -> torch.Tensor | None:
    """A (B, 1, 1, keys) boolean mask for [image keys; text keys], or None."""
    if mask is None:
        return None
    image = torch.ones(mask.shape[0], image_keys, dtype=torch.bool, device=mask.device)
    return torch.cat([image, mask.to(torch.bool)], dim=1)[:, None, None, :]


def joint_attention(
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    groups: SequenceGroups,
    text_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of [image; text] queries over [image; text] keys, where each rank holds its
    shard of the image tokens and the whole text. Inputs (B, S, H, D); returns this rank's
    image outputs (B, S_local, H, D) and the whole text's (B, L, H, D) (None without text)."""
    q, k, v = image
    if groups.ulysses_size > 1:
        q, k, v = (seq_to_heads(x, groups.ulysses, groups.ulysses_size) for x in (q, k, v))
        if text is not None:
            text = tuple(x.chunk(groups.ulysses_size, dim=2)[groups.ulysses_rank] for x in text)
    image_queries = q.shape[1]
    queries = q if text is None else torch.cat([q, text[0]], dim=1)
    if groups.ring_size == 1:
        keys = k if text is None else torch.cat([k, text[1]], dim=1)
        values = v if text is None else torch.cat([v, text[2]], dim=1)
        mask = _text_mask(text_mask, k.shape[1])
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
        ).transpose(1, 2)
    else:
        out = _ring(queries, k, v, text, text_mask, groups, scale)
    out = out.to(q.dtype)
    image_out, text_out = (
        out[:, :image_queries],
        (out[:, image_queries:] if text is not None else None),
    )
    if groups.ulysses_size > 1:
        image_out = heads_to_seq(image_out, groups.ulysses, groups.ulysses_size)
        if text_out is not None:
            text_out = gather_heads(text_out, groups.ulysses, groups.ulysses_size)
    return image_out, text_out


def _ring(queries, k, v, text, text_mask, groups: SequenceGroups, scale):
    """Every ring rank's image key/value chunk gathered, then merged chunk by chunk in ring
    order; the text keys join the pass over this rank's own chunk."""
    size = groups.ring_size
    kv = torch.cat([k.flatten(), v.flatten()]).contiguous()
    chunks = all_gather(kv, 0, groups.ring).chunk(size)
    out = lse = None
    for step in range(size):
        source = (groups.ring_rank + step) % size
        keys, values = (
            chunks[source][: k.numel()].view_as(k),
            chunks[source][k.numel() :].view_as(v),
        )
        mask = None
        if step == 0 and text is not None:
            mask = _text_mask(text_mask, keys.shape[1])
            keys, values = torch.cat([keys, text[1]], dim=1), torch.cat([values, text[2]], dim=1)
        part, part_lse = attention_with_lse(queries, keys, values, scale, mask)
        out, lse = _merge(part, part_lse, out, lse)
    return out
