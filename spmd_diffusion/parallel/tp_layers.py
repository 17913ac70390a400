"""What a tensor-parallel rank runs in place of the layers it shards (see :mod:`.tensor_parallel`).

Linears keep DTensor parameters (sharded by torch's ``parallelize_module``) but multiply
their local shards directly: DTensor's per-call dispatch is pure Python and made tp=2 slower
than one rank (benchmarks/RESULTS.md). That local forward, like every other patch of a
forward here, is a diffusers hook (:mod:`spmd_diffusion.models.hooks`). Beside the
column-/row-wise Linears of Megatron:

- :class:`LocalColwiseGather`: a column-wise Linear whose output every rank needs whole
  (adaLN modulation: shift/scale/gate over the full width): the shards' outputs are
  all-gathered. The weight is sharded; the gathered vector is one token per sample.
- :class:`ShardedRMSNorm`: an RMSNorm over the full width of heads that are sharded (qk-norm
  across heads, Wan and LTX): the sum of squares is all-reduced, each rank scales its part.
- :func:`shard_conv_ffn`: Sana's GLUMBConv (1x1 conv to [hidden; gate], depthwise 3x3, gate,
  1x1 conv back) with its channels split, [hidden; gate] blocks paired per rank, and the last
  conv's partial sums all-reduced.
"""

# ruff: noqa: PLC0415 - diffusers' hook class is imported where a hook is made

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from spmd_diffusion.models.hooks import add_hook, wrap_forward
from spmd_diffusion.parallel.sp_attention import all_gather

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

LINEAR_HOOK = "spmd_tp_local_linear"


class LocalForward:
    """A sharded Linear's forward on its local shards, in place of DTensor's dispatch."""

    def __init__(self, local: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.local = local

    def forward(self, inner: Any, hidden: torch.Tensor) -> torch.Tensor:
        return self.local(hidden)


class LocalColwiseParallel(ColwiseParallel):
    """ColwiseParallel's sharding (weight and bias Shard(0)); the forward multiplies the
    local shard of a replicated input without DTensor dispatch."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__} supports nn.Linear only")
        self._partition_linear_fn("", module, device_mesh)
        wrap_forward(module, LINEAR_HOOK, LocalForward(functools.partial(_colwise_forward, module)))
        return module


class LocalColwiseGather(ColwiseParallel):
    """Column-wise sharding whose output is all-gathered back to full width on every rank."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__} supports nn.Linear only")
        self._partition_linear_fn("", module, device_mesh)
        local = functools.partial(
            _colwise_gather_forward, module, device_mesh.get_group(), device_mesh.size()
        )
        wrap_forward(module, LINEAR_HOOK, LocalForward(local))
        return module


class LocalRowwiseParallel(RowwiseParallel):
    """RowwiseParallel's sharding (weight Shard(1), bias replicated); the forward multiplies
    the local shard of a last-dim-sharded input, all-reduces over the tp group, adds the bias."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__} supports nn.Linear only")
        self._partition_linear_fn("", module, device_mesh)
        local = functools.partial(_rowwise_forward, module, device_mesh.get_group())
        wrap_forward(module, LINEAR_HOOK, LocalForward(local))
        return module


def _colwise_forward(module: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    bias = module.bias.to_local() if module.bias is not None else None
    return F.linear(hidden, module.weight.to_local(), bias)


def _colwise_gather_forward(
    module: nn.Linear, group: Any, size: int, hidden: torch.Tensor
) -> torch.Tensor:
    local = _colwise_forward(module, hidden)
    moved = local.movedim(-1, 0)  # gather along the features: the first dim for the collective
    return all_gather(moved, 0, group).movedim(0, -1)


def _rowwise_forward(module: nn.Linear, group: Any, hidden: torch.Tensor) -> torch.Tensor:
    partial_sum = F.linear(hidden, module.weight.to_local())
    total = funcol.wait_tensor(funcol.all_reduce(partial_sum, "sum", group))
    return total + module.bias.to_local() if module.bias is not None else total


class ShardedRMSNorm(nn.Module):
    """An RMSNorm over ``width`` features of which this rank holds a contiguous shard."""

    def __init__(self, norm: nn.Module, width: int, rank: int, size: int, group: Any) -> None:
        super().__init__()
        block = width // size
        self.width, self.group = width, group
        self.eps = getattr(norm, "eps", None)
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        self.weight = (
            nn.Parameter(weight.detach()[rank * block : (rank + 1) * block].clone())
            if isinstance(weight, torch.Tensor)
            else None
        )
        self.bias = (
            nn.Parameter(bias.detach()[rank * block : (rank + 1) * block].clone())
            if isinstance(bias, torch.Tensor)
            else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        squares = hidden.to(torch.float32).pow(2).sum(-1, keepdim=True)
        total = funcol.wait_tensor(funcol.all_reduce(squares, "sum", self.group))
        eps = self.eps if self.eps is not None else torch.finfo(dtype).eps
        hidden = (hidden.to(torch.float32) * torch.rsqrt(total / self.width + eps)).to(dtype)
        if self.weight is not None:
            hidden = hidden * self.weight
        if self.bias is not None:
            hidden = hidden + self.bias
        return hidden


def slice_full_width_rotary(attn: nn.Module, width: int, rank: int, size: int) -> None:
    """LTX applies its rotary embedding to q and k over the whole width of all heads, before
    splitting heads: on a rank holding ``width / size`` of those features, the embedding's
    (cos, sin) are cut to the same block. Rotary embeddings of one head's width (Flux, Wan,
    Qwen-Image) pass unchanged."""
    from diffusers.hooks import ModelHook

    block = width // size

    def local(value: Any) -> Any:
        if (
            isinstance(value, tuple)
            and value
            and all(isinstance(t, torch.Tensor) and t.shape[-1] == width for t in value)
        ):
            return tuple(t[..., rank * block : (rank + 1) * block] for t in value)
        return value

    class LocalRotaryHook(ModelHook):
        _is_stateful = False

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any):
            if "image_rotary_emb" in kwargs:
                kwargs["image_rotary_emb"] = local(kwargs["image_rotary_emb"])
            elif len(args) > 3:
                args = (*args[:3], local(args[3]), *args[4:])
            return args, kwargs

    add_hook(attn, LocalRotaryHook(), "spmd_tp_local_rotary")


def _take(
    tensor: torch.Tensor, order: torch.Tensor | None, rank: int, size: int, dim: int = 0
) -> nn.Parameter:
    if order is not None:
        tensor = tensor.index_select(dim, order.to(tensor.device))
    return nn.Parameter(tensor.detach().chunk(size, dim=dim)[rank].clone())


def shard_conv_ffn(ffn: nn.Module, rank: int, size: int, group: Any, order: torch.Tensor) -> None:
    """Split a GLUMBConv's channels over the tp group in place (see the module docstring);
    ``order`` pairs each rank's hidden block with its gate block (:func:`gated_row_order`)."""
    from diffusers.hooks import ModelHook

    inverted, depth, point = ffn.conv_inverted, ffn.conv_depth, ffn.conv_point
    inverted.weight = _take(inverted.weight, order, rank, size)
    if inverted.bias is not None:
        inverted.bias = _take(inverted.bias, order, rank, size)
    inverted.out_channels //= size
    depth.weight = _take(depth.weight, order, rank, size)
    if depth.bias is not None:
        depth.bias = _take(depth.bias, order, rank, size)
    depth.in_channels //= size
    depth.out_channels //= size
    depth.groups //= size
    point.weight = _take(point.weight, None, rank, size, dim=1)
    point.in_channels //= size

    class AllReduceHook(ModelHook):
        _is_stateful = False

        def post_forward(self, module: Any, output: torch.Tensor) -> torch.Tensor:
            return funcol.wait_tensor(funcol.all_reduce(output, "sum", group))

    add_hook(point, AllReduceHook(), "spmd_tp_all_reduce")
