"""Tensor parallelism for diffusers denoisers, planned automatically from the module tree.

Megatron-style sharding expressed with torch's DTensor API (``parallelize_module`` with
``ColwiseParallel`` / ``RowwiseParallel``), as torchtitan does for its models:

- attention (diffusers ``Attention`` and the newer classes with the same layout: Flux, SD3,
  ...): ``to_q/to_k/to_v`` (and ``add_q_proj/add_k_proj/add_v_proj``) colwise, so each rank
  holds ``heads / tp`` whole heads; ``to_out[0]`` (and ``to_add_out``) rowwise, whose output
  is all-reduced. The module's ``heads`` (and ``inner_dim``) become the local values, so the
  processors reshape the local projections correctly.
- ``FeedForward``: the input projection ``net[0].proj`` colwise, the output linear rowwise.
  Gated activations (GEGLU, SwiGLU) chunk their projection into [hidden; gate] halves; a
  plain column split would give rank 0 all of ``hidden`` and rank 1 all of ``gate`` (wrong
  images: 0.54 max pixel error on a real SD-1.x model, 0.085 on the tiny test UNet). The
  rows are permuted first so that each rank's shard is [its hidden block; the matching gate
  block].

So each transformer block costs one all-reduce per attention and one per feed-forward.

Runtime: the weights are sharded by ``parallelize_module`` with subclasses of torch's
``ColwiseParallel``/``RowwiseParallel`` (same placements: Shard(0), Shard(1) + replicated
bias), but the sharded Linears then multiply their local shards directly, and the row-wise
ones all-reduce with ``torch.distributed._functional_collectives.all_reduce`` -- the same
collective DTensor's Partial -> Replicate redistribution issues. DTensor's per-call
dispatch is pure Python (sharding propagation, and for a row-wise Linear on a 3-D input a
fake-tensor decomposition on every call): measured on the 2-core CPU VM with torch 2.13,
~0.3 ms per column-wise and 5-13 ms per row-wise Linear besides the all-reduce, which made
tp=2 slower than one rank (benchmarks/RESULTS.md). ``dtensor_forward=True`` keeps
torch's stock styles and DTensor dispatch on every call (same results, slower).

Only the denoiser is sharded. Text encoders and the VAE stay replicated: they run once per
image, while the denoiser runs every step (2x with guidance), so they are a small share of
the time; sharding them would add collectives for little gain.

The weights are sharded from each rank's own copy (``src_data_rank=None``): every rank loads
the same checkpoint, and nothing is broadcast. After sharding, the denoiser's state dict
holds DTensors, and the gated projections' rows are in the permuted order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

COLWISE, ROWWISE = "colwise", "rowwise"
# Attention projections that this plan knows; any other Linear inside an attention module
# (IP-adapter, gating, ...) may consume the sharded heads, so such a module is left alone.
QKV_NAMES = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
OUT_NAMES = ("to_out.0", "to_out", "to_add_out")
QK_NORM_NAMES = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
# diffusers activations: a ``proj`` Linear followed by an elementwise function.
PLAIN_ACTIVATIONS = ("GELU", "ApproximateGELU", "LinearActivation")
GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")  # proj -> chunk(2, dim=-1) -> hidden * act(gate)
PASSIVE_LAYERS = (nn.Dropout, nn.Identity)


@dataclass
class TPPlan:
    """What :func:`apply_tensor_parallel` will do; built without touching any weight."""

    tp: int
    styles: dict[str, str] = field(default_factory=dict)  # module path -> COLWISE / ROWWISE
    attention: dict[str, int] = field(default_factory=dict)  # module path -> global heads
    feedforward: list[str] = field(default_factory=list)
    gated: dict[str, int] = field(default_factory=dict)  # gated proj path -> half width
    skipped: dict[str, str] = field(default_factory=dict)  # module path -> why left replicated


@dataclass
class TPReport:
    """What was sharded, what was not and why, and the parameter memory of one rank."""

    tp: int
    attention: list[str]
    feedforward: list[str]
    gated: list[str]
    skipped: dict[str, str]
    param_bytes_before: int
    param_bytes_after: int

    @property
    def param_ratio(self) -> float:
        return self.param_bytes_after / self.param_bytes_before if self.param_bytes_before else 1.0

    def describe(self) -> dict[str, Any]:
        """run.json's ``"parallel"."tp"``: what was sharded, what stayed whole and why."""
        return {"degree": self.tp, "sharded": {"attention": self.attention, "feedforward": self.feedforward},
                "replicated": [{"module": path, "why": why} for path, why in self.skipped.items()],
                "param_fraction": round(self.param_ratio, 4)}

    def summary(self) -> str:
        mib = 2**20
        text = (
            f"tensor parallel tp={self.tp}: sharded {len(self.attention)} attention and "
            f"{len(self.feedforward)} feed-forward modules ({len(self.gated)} gated, rows permuted); "
            f"{len(self.skipped)} left replicated; denoiser parameters per rank "
            f"{self.param_bytes_before / mib:.1f} MiB -> {self.param_bytes_after / mib:.1f} MiB "
            f"({self.param_ratio:.2f}x)"
        )
        for path, reason in self.skipped.items():
            text += f"\n  replicated {path}: {reason}"
        return text


def param_bytes(module: nn.Module) -> int:
    """Bytes of parameters held by this rank (the local shard of each DTensor)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for param in module.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def gated_row_order(half_width: int, tp: int) -> torch.Tensor:
    """Row order of a gated projection ([hidden; gate], ``half_width`` rows each) such that
    an even split into ``tp`` blocks gives rank r [hidden block r; gate block r]."""
    if half_width % tp:
        raise ValueError(f"gated width {half_width} is not divisible by tp={tp}")
    block = half_width // tp
    rows = torch.arange(2 * half_width).view(2, tp, block)  # [half][rank][row]
    return rows.transpose(0, 1).reshape(-1)


class LocalColwiseParallel(ColwiseParallel):
    """ColwiseParallel's sharding (weight and bias Shard(0)); the forward multiplies the
    local shard of a replicated input without DTensor dispatch."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__} supports nn.Linear only")
        self._partition_linear_fn("", module, device_mesh)
        module.forward = functools.partial(_colwise_forward, module)
        return module


class LocalRowwiseParallel(RowwiseParallel):
    """RowwiseParallel's sharding (weight Shard(1), bias replicated); the forward multiplies
    the local shard of a last-dim-sharded input, all-reduces over the tp group, adds the bias."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__} supports nn.Linear only")
        self._partition_linear_fn("", module, device_mesh)
        module.forward = functools.partial(_rowwise_forward, module, device_mesh.get_group())
        return module


def _colwise_forward(module: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    bias = module.bias.to_local() if module.bias is not None else None
    return F.linear(hidden, module.weight.to_local(), bias)


def _rowwise_forward(module: nn.Linear, group: Any, hidden: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    partial_sum = F.linear(hidden, module.weight.to_local())
    total = funcol.wait_tensor(funcol.all_reduce(partial_sum, "sum", group))
    return total + module.bias.to_local() if module.bias is not None else total


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    for name in path.split("."):
        if module is None:
            return None
        if name.isdigit():
            children = module if isinstance(module, (nn.ModuleList, nn.Sequential)) else None
            module = children[int(name)] if children is not None and int(name) < len(children) else None
        else:
            module = getattr(module, name, None)
    return module if isinstance(module, nn.Linear) else None


def is_attention(module: nn.Module) -> bool:
    """diffusers attention layout: q/k/v Linear projections and an integer ``heads``."""
    return (
        all(isinstance(getattr(module, name, None), nn.Linear) for name in ("to_q", "to_k", "to_v"))
        and isinstance(getattr(module, "heads", None), int)
    )


def is_feedforward(module: nn.Module) -> bool:
    """diffusers FeedForward layout: ``net`` = [activation with ``proj``, dropout, Linear, ...]."""
    net = getattr(module, "net", None)
    return (
        isinstance(net, (nn.ModuleList, nn.Sequential))
        and len(net) >= 2
        and isinstance(getattr(net[0], "proj", None), nn.Linear)
    )


def _norm_width(norm: nn.Module) -> int | None:
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[-1]) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    weight = getattr(norm, "weight", None)
    return weight.numel() if isinstance(weight, torch.Tensor) else None


def _plan_attention(plan: TPPlan, path: str, attn: nn.Module, errors: list[str]) -> None:
    heads, inner = attn.heads, attn.to_q.out_features
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        plan.skipped[path] = "fused qkv projection"
        return
    if heads < 1 or inner % heads:
        plan.skipped[path] = f"q width {inner} is not a multiple of heads={heads}"
        return
    head_dim = inner // heads
    outs = [name for name in OUT_NAMES if _linear(attn, name) is not None]
    if not any(name in outs for name in ("to_out.0", "to_out")):
        plan.skipped[path] = "no output projection (pre_only): its output feeds a replicated layer"
        return
    qkv = [name for name in QKV_NAMES if _linear(attn, name) is not None]
    for name in qkv:
        width = _linear(attn, name).out_features
        if width != inner:
            plan.skipped[path] = f"{name} width {width} != q width {inner} (GQA/MQA)"
            return
    known = {id(_linear(attn, name)) for name in qkv + outs}
    for name, child in attn.named_modules():
        if isinstance(child, nn.Linear) and id(child) not in known:
            plan.skipped[path] = f"unknown projection {name!r} may read the sharded heads"
            return
    for name in QK_NORM_NAMES:
        norm = getattr(attn, name, None)
        width = _norm_width(norm) if isinstance(norm, nn.Module) else None
        if width is not None and width != head_dim:
            plan.skipped[path] = f"{name} normalises across heads (width {width}, head dim {head_dim})"
            return
    if heads % plan.tp:
        errors.append(f"{path} ({type(attn).__name__}): heads={heads} is not divisible by tp={plan.tp}")
        return
    plan.attention[path] = heads
    for name in qkv:
        plan.styles[f"{path}.{name}"] = COLWISE
    for name in outs:
        plan.styles[f"{path}.{name}"] = ROWWISE


def _plan_feedforward(plan: TPPlan, path: str, ff: nn.Module, errors: list[str]) -> None:
    net = ff.net
    act = net[0]
    kind = type(act).__name__
    linears = [i for i, layer in enumerate(net) if isinstance(layer, nn.Linear)]
    if kind not in PLAIN_ACTIVATIONS + GATED_ACTIVATIONS:
        plan.skipped[path] = f"activation {kind} is not a known elementwise diffusers activation"
        return
    if len(linears) != 1 or any(
        not isinstance(layer, PASSIVE_LAYERS) for i, layer in enumerate(net) if i not in (0, linears[0])
    ):
        plan.skipped[path] = "net is not [activation, dropout, Linear(, dropout)]"
        return
    out = net[linears[0]]
    width, proj_width = out.in_features, act.proj.out_features
    gated = kind in GATED_ACTIVATIONS
    if proj_width != (2 * width if gated else width):
        plan.skipped[path] = f"{kind} projection width {proj_width} does not match the output's input {width}"
        return
    if width % plan.tp:
        errors.append(f"{path} (FeedForward): hidden width {width} is not divisible by tp={plan.tp}")
        return
    plan.feedforward.append(path)
    plan.styles[f"{path}.net.0.proj"] = COLWISE
    plan.styles[f"{path}.net.{linears[0]}"] = ROWWISE
    if gated:
        plan.gated[f"{path}.net.0.proj"] = width


def build_tp_plan(denoiser: nn.Module, tp: int) -> TPPlan:
    """The sharding plan of ``denoiser`` for ``tp`` ranks; raises ValueError, naming every
    module, when a head count or feed-forward width is not divisible by ``tp``."""
    if tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    plan, errors = TPPlan(tp=tp), []
    claimed: list[str] = []  # a plan never reaches inside a module it already planned
    for path, module in denoiser.named_modules():
        if not path or any(path.startswith(prefix + ".") for prefix in claimed):
            continue
        if is_attention(module):
            _plan_attention(plan, path, module, errors)
            claimed.append(path)
        elif is_feedforward(module):
            _plan_feedforward(plan, path, module, errors)
            claimed.append(path)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        listed = "; ".join(errors[:5])
        raise ValueError(f"cannot shard {type(denoiser).__name__} over tp={tp}: {listed}{more}")
    return plan


def _permute_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    with torch.no_grad():
        order = order.to(linear.weight.device)
        linear.weight.copy_(linear.weight[order])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[order])


def _localise_heads(attn: nn.Module, tp: int) -> None:
    """Make the module describe its local shard: processors read ``heads`` (and some
    ``inner_dim // heads``) to reshape the projections."""
    attn.heads = attn.heads // tp
    for name in ("sliceable_head_dim", "inner_dim", "inner_kv_dim"):
        value = getattr(attn, name, None)
        if isinstance(value, int) and value % tp == 0:
            setattr(attn, name, value // tp)


def apply_tensor_parallel(
    denoiser: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    dtensor_forward: bool = False,
    permute_gated: bool = True,
) -> TPReport:
    """Shard ``denoiser`` in place over the 1-D ``tp_mesh`` (``mesh["tp"]``); a collective-free
    call that every rank of the tp group must make on identical weights, after the denoiser
    is on its device. ``dtensor_forward=True`` runs every sharded Linear through DTensor
    dispatch (torch's stock styles) instead of on its local shard. ``permute_gated=False``
    exists only to show that a plain split of a gated projection is wrong; never use it."""
    from torch.distributed.tensor.parallel import parallelize_module

    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D (mesh['tp']), got a {tp_mesh.ndim}-D mesh")
    tp = tp_mesh.size()
    plan = build_tp_plan(denoiser, tp)  # raises before anything is changed
    before = param_bytes(denoiser)
    if permute_gated:
        for path, half in plan.gated.items():
            _permute_rows(_linear(denoiser, path), gated_row_order(half, tp))
    colwise: type = ColwiseParallel if dtensor_forward else LocalColwiseParallel
    rowwise: type = RowwiseParallel if dtensor_forward else LocalRowwiseParallel
    styles: dict[str, Any] = {
        path: colwise() if kind == COLWISE else rowwise() for path, kind in plan.styles.items()
    }
    if styles:
        parallelize_module(denoiser, tp_mesh, styles, src_data_rank=None)
    for path in plan.attention:
        _localise_heads(denoiser.get_submodule(path), tp)
    return TPReport(
        tp=tp,
        attention=list(plan.attention),
        feedforward=list(plan.feedforward),
        gated=list(plan.gated),
        skipped=dict(plan.skipped),
        param_bytes_before=before,
        param_bytes_after=param_bytes(denoiser),
    )
