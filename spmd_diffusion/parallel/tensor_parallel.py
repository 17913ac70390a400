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

- single-stream blocks (Flux): q/k/v and ``proj_mlp`` colwise, and ``proj_out``, which reads
  ``cat([attention, mlp])``, rowwise over input columns reordered so each rank's shard is
  [its attention block; its mlp block] (diffusers' PackedRowwiseParallel, by permutation);
- qk-norm across heads (Wan, LTX): an RMSNorm over all heads becomes a sharded RMSNorm whose
  sum of squares is all-reduced (:class:`.tp_layers.ShardedRMSNorm`);
- adaLN modulation Linears (dim -> k x dim, one token per sample): colwise, outputs gathered;
  they hold about a third of an MMDiT block's weights;
- Sana's GLUMBConv: its convolutions' channels split, [hidden; gate] paired per rank.

Where the denoiser class carries diffusers' own ``_tp_plan`` (Flux, Flux2, Qwen-Image), its
Linear styles are taken from it, and the tool's additions (modulation, sharded norms) join.
So each transformer block costs one all-reduce per attention and one per feed-forward, and an
all-gather of a vector per modulation.

Runtime: the weights are sharded by ``parallelize_module`` with subclasses of torch's
``ColwiseParallel``/``RowwiseParallel`` (same placements: Shard(0), Shard(1) + replicated
bias), but the sharded Linears then multiply their local shards directly, and the row-wise
ones all-reduce with ``torch.distributed._functional_collectives.all_reduce`` -- the same
collective DTensor's Partial -> Replicate redistribution issues. DTensor's per-call
dispatch is pure Python (sharding propagation, and for a row-wise Linear on a 3-D input a
fake-tensor decomposition on every call), milliseconds per row-wise Linear besides the
all-reduce, which made tp=2 slower than one rank (benchmarks/RESULTS.md, "Measurements
behind design choices"). ``dtensor_forward=True`` keeps
torch's stock styles and DTensor dispatch on every call (same results, slower).

Only the denoiser is sharded. Text encoders and the VAE stay replicated: they run once per
image, while the denoiser runs every step (2x with guidance), so they are a small share of
the time; sharding them would add collectives for little gain.

The weights are sharded from each rank's own copy (``src_data_rank=None``): every rank loads
the same checkpoint, and nothing is broadcast. After sharding, the denoiser's state dict
holds DTensors, and the gated projections' rows are in the permuted order.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from spmd_diffusion.parallel.tp_layers import (
    LocalColwiseGather,
    LocalColwiseParallel,
    LocalRowwiseParallel,
    ShardedRMSNorm,
    shard_conv_ffn,
    slice_full_width_rotary,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

COLWISE, ROWWISE, GATHERED = "colwise", "rowwise", "colwise-gathered"
# Attention projections that this plan knows; any other Linear inside an attention module
# (IP-adapter, gating, ...) may consume the sharded heads, so such a module is left alone.
QKV_NAMES = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
OUT_NAMES = ("to_out.0", "to_out", "to_add_out")
QK_NORM_NAMES = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
RMS_NORMS = ("RMSNorm",)  # torch's and diffusers' class name: the norms a sharded RMSNorm replaces
MODULATION_PARENTS = ("AdaLayerNorm", "SD35AdaLayerNorm")  # class-name prefixes of adaLN modulation
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
    packed: dict[str, list[int]] = field(
        default_factory=dict
    )  # rowwise path -> widths of its input blocks
    norms: dict[str, int] = field(
        default_factory=dict
    )  # norm path -> full width (qk-norm across heads)
    modulation: list[str] = field(default_factory=list)  # adaLN modulation Linears (gathered)
    convs: list[str] = field(default_factory=list)  # GLUMBConv feed-forwards
    source: str = "derived"  # "derived" from the module tree, or "model" (the class's own _tp_plan)


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
    modulation: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    source: str = "derived"

    @property
    def param_ratio(self) -> float:
        return self.param_bytes_after / self.param_bytes_before if self.param_bytes_before else 1.0

    def describe(self) -> dict[str, Any]:
        """run.json's ``"parallel"."tp"``: what was sharded, what stayed whole and why."""
        return {
            "degree": self.tp,
            "plan": self.source,
            "sharded": {
                "attention": self.attention,
                "feedforward": self.feedforward,
                "modulation": self.modulation,
                "norms": self.norms,
            },
            "replicated": [{"module": path, "why": why} for path, why in self.skipped.items()],
            "param_fraction": round(self.param_ratio, 4),
        }

    def summary(self) -> str:
        mib = 2**20
        text = (
            f"tensor parallel tp={self.tp} ({self.source} plan): "
            f"sharded {len(self.attention)} attention and "
            f"{len(self.feedforward)} feed-forward modules "
            f"({len(self.gated)} gated, rows permuted), "
            f"{len(self.modulation)} modulation linears "
            f"and {len(self.norms)} qk-norms across heads; "
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


def _linear(module: nn.Module, path: str) -> nn.Linear | None:
    for name in path.split("."):
        if module is None:
            return None
        if name.isdigit():
            children = module if isinstance(module, (nn.ModuleList, nn.Sequential)) else None
            module = (
                children[int(name)] if children is not None and int(name) < len(children) else None
            )
        else:
            module = getattr(module, name, None)
    return module if isinstance(module, nn.Linear) else None


def is_attention(module: nn.Module) -> bool:
    """diffusers attention layout: q/k/v Linear projections and an integer ``heads``."""
    return all(
        isinstance(getattr(module, name, None), nn.Linear) for name in ("to_q", "to_k", "to_v")
    ) and isinstance(getattr(module, "heads", None), int)


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


def _plan_attention(
    plan: TPPlan, path: str, attn: nn.Module, errors: list[str], pre_only: bool = False
) -> bool:
    """Plan one attention module; ``pre_only``: it has no output projection because its
    parent (a single-stream block) projects its output together with an MLP's."""
    heads, inner = attn.heads, attn.to_q.out_features
    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        plan.skipped[path] = "fused qkv projection"
        return False
    if heads < 1 or inner % heads:
        plan.skipped[path] = f"q width {inner} is not a multiple of heads={heads}"
        return False
    head_dim = inner // heads
    outs = [name for name in OUT_NAMES if _linear(attn, name) is not None]
    if not pre_only and not any(name in outs for name in ("to_out.0", "to_out")):
        plan.skipped[path] = "no output projection (pre_only): its output feeds a replicated layer"
        return False
    qkv = [name for name in QKV_NAMES if _linear(attn, name) is not None]
    for name in qkv:
        width = _linear(attn, name).out_features
        if width != inner:
            plan.skipped[path] = f"{name} width {width} != q width {inner} (GQA/MQA)"
            return False
    known = {id(_linear(attn, name)) for name in qkv + outs}
    for name, child in attn.named_modules():
        if isinstance(child, nn.Linear) and id(child) not in known:
            plan.skipped[path] = f"unknown projection {name!r} may read the sharded heads"
            return False
    norms = _plan_qk_norms(plan, path, attn, head_dim, inner)
    if norms is None:
        return False
    if heads % plan.tp:
        errors.append(
            f"{path} ({type(attn).__name__}): heads={heads} is not divisible by tp={plan.tp}"
        )
        return False
    plan.attention[path] = heads
    plan.norms.update(norms)
    for name in qkv:
        plan.styles[f"{path}.{name}"] = COLWISE
    for name in outs:
        plan.styles[f"{path}.{name}"] = ROWWISE
    return True


def _plan_qk_norms(
    plan: TPPlan, path: str, attn: nn.Module, head_dim: int, inner: int
) -> dict[str, int] | None:
    """The qk-norms to shard (an RMSNorm over all heads), or None when one cannot follow
    the heads (a LayerNorm across heads, or any other width): the attention stays whole."""
    norms: dict[str, int] = {}
    for name in QK_NORM_NAMES:
        norm = getattr(attn, name, None)
        width = _norm_width(norm) if isinstance(norm, nn.Module) else None
        if width is None or width == head_dim:
            continue
        if width == inner and type(norm).__name__ in RMS_NORMS:
            norms[f"{path}.{name}"] = width
            continue
        plan.skipped[path] = f"{name} normalises across heads (width {width}, head dim {head_dim})"
        return None
    return norms


def is_single_stream(module: nn.Module) -> bool:
    """Flux's single-stream block layout: an attention without output projection and an MLP
    (``proj_mlp``) whose outputs are concatenated into ``proj_out``."""
    attn, mlp, out = (getattr(module, name, None) for name in ("attn", "proj_mlp", "proj_out"))
    return (
        isinstance(mlp, nn.Linear)
        and isinstance(out, nn.Linear)
        and attn is not None
        and is_attention(attn)
        and _linear(attn, "to_out.0") is None
        and _linear(attn, "to_out") is None
        and out.in_features == attn.to_q.out_features + mlp.out_features
    )


def _plan_single_stream(plan: TPPlan, path: str, block: nn.Module, errors: list[str]) -> None:
    inner, width = block.attn.to_q.out_features, block.proj_mlp.out_features
    if width % plan.tp:
        errors.append(
            f"{path} (single-stream block): mlp width {width} is not divisible by tp={plan.tp}"
        )
        return
    if not _plan_attention(plan, f"{path}.attn", block.attn, errors, pre_only=True):
        plan.skipped.setdefault(f"{path}.proj_mlp", "its block's attention stays whole")
        return
    plan.feedforward.append(f"{path}.proj_mlp")
    plan.styles[f"{path}.proj_mlp"] = COLWISE
    plan.styles[f"{path}.proj_out"] = ROWWISE
    plan.packed[f"{path}.proj_out"] = [inner, width]


def is_conv_ffn(module: nn.Module) -> bool:
    """Sana's GLUMBConv: 1x1 conv to [hidden; gate], depthwise 3x3, gate, 1x1 conv back."""
    return all(
        isinstance(getattr(module, name, None), nn.Conv2d)
        for name in ("conv_inverted", "conv_depth", "conv_point")
    )


def _plan_conv_ffn(plan: TPPlan, path: str, ffn: nn.Module, errors: list[str]) -> None:
    hidden = ffn.conv_point.in_channels
    if ffn.conv_point.bias is not None or ffn.conv_depth.groups != ffn.conv_depth.in_channels:
        plan.skipped[path] = (
            "conv feed-forward is not [1x1 conv, depthwise conv, gate, 1x1 conv without bias]"
        )
        return
    if hidden % plan.tp:
        errors.append(
            f"{path} (GLUMBConv): hidden channels {hidden} are not divisible by tp={plan.tp}"
        )
        return
    plan.convs.append(path)
    plan.feedforward.append(path)


def _plan_modulation(plan: TPPlan, denoiser: nn.Module) -> None:
    """adaLN modulation Linears: colwise with their outputs gathered, where the width divides."""
    for path, module in denoiser.named_modules():
        linear = None
        if type(module).__name__.startswith(MODULATION_PARENTS):
            linear, target = getattr(module, "linear", None), f"{path}.linear"
        elif path.endswith("_mod") and isinstance(module, nn.Sequential) and len(module):
            linear, target = module[-1], f"{path}.{len(module) - 1}"  # Qwen-Image: SiLU then Linear
        if (
            isinstance(linear, nn.Linear)
            and linear.out_features % plan.tp == 0
            and target not in plan.styles
        ):
            plan.styles[target] = GATHERED
            plan.modulation.append(target)


def _plan_feedforward(plan: TPPlan, path: str, ff: nn.Module, errors: list[str]) -> None:
    net = ff.net
    act = net[0]
    kind = type(act).__name__
    linears = [i for i, layer in enumerate(net) if isinstance(layer, nn.Linear)]
    if kind not in PLAIN_ACTIVATIONS + GATED_ACTIVATIONS:
        plan.skipped[path] = f"activation {kind} is not a known elementwise diffusers activation"
        return
    if len(linears) != 1 or any(
        not isinstance(layer, PASSIVE_LAYERS)
        for i, layer in enumerate(net)
        if i not in (0, linears[0])
    ):
        plan.skipped[path] = "net is not [activation, dropout, Linear(, dropout)]"
        return
    out = net[linears[0]]
    width, proj_width = out.in_features, act.proj.out_features
    gated = kind in GATED_ACTIVATIONS
    if proj_width != (2 * width if gated else width):
        plan.skipped[path] = (
            f"{kind} projection width {proj_width} does not match the output's input {width}"
        )
        return
    if width % plan.tp:
        errors.append(
            f"{path} (FeedForward): hidden width {width} is not divisible by tp={plan.tp}"
        )
        return
    plan.feedforward.append(path)
    plan.styles[f"{path}.net.0.proj"] = COLWISE
    plan.styles[f"{path}.net.{linears[0]}"] = ROWWISE
    if gated:
        plan.gated[f"{path}.net.0.proj"] = width


def build_tp_plan(denoiser: nn.Module, tp: int, use_model_plan: bool = True) -> TPPlan:
    """The sharding plan of ``denoiser`` for ``tp`` ranks: the class's own ``_tp_plan`` where
    it has one (``use_model_plan``), else derived from the module tree; raises ValueError,
    naming every module, when a head count or width is not divisible by ``tp``."""
    if tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    plan, errors = TPPlan(tp=tp), []
    model_plan = getattr(type(denoiser), "_tp_plan", None) if use_model_plan else None
    if model_plan:
        _plan_from_model(plan, denoiser, model_plan, errors)
    else:
        _plan_derived(plan, denoiser, errors)
    _plan_modulation(plan, denoiser)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        listed = "; ".join(errors[:5])
        raise ValueError(f"cannot shard {type(denoiser).__name__} over tp={tp}: {listed}{more}")
    return plan


def _plan_derived(plan: TPPlan, denoiser: nn.Module, errors: list[str]) -> None:
    claimed: list[str] = []  # a plan never reaches inside a module it already planned
    for path, module in denoiser.named_modules():
        if not path or any(path.startswith(prefix + ".") for prefix in claimed):
            continue
        planner = (
            _plan_single_stream
            if is_single_stream(module)
            else _plan_attention
            if is_attention(module)
            else _plan_feedforward
            if is_feedforward(module)
            else _plan_conv_ffn
            if is_conv_ffn(module)
            else None
        )
        if planner is not None:
            planner(plan, path, module, errors)
            claimed.append(path)


def _plan_from_model(
    plan: TPPlan, denoiser: nn.Module, model_plan: dict[str, Any], errors: list[str]
) -> None:
    """Linear styles from diffusers' ``_tp_plan`` (glob patterns -> colwise / rowwise /
    PackedRowwiseParallel); the attention modules whose q is colwise get their heads (and
    qk-norms across heads) planned as in the derived plan."""

    plan.source = "model"
    names = {path for path, module in denoiser.named_modules() if isinstance(module, nn.Linear)}
    for pattern, style in model_plan.items():
        kind = style if isinstance(style, str) else type(style).__name__
        for path in sorted(fnmatch.filter(names, pattern)):
            if kind in (COLWISE, ROWWISE):
                plan.styles[path] = kind
            elif kind == "PackedRowwiseParallel":
                plan.styles[path] = ROWWISE
                blocks = (
                    getattr(style, "blocks", None)
                    or denoiser.get_submodule(path)._tp_packed_row_blocks
                )
                total = denoiser.get_submodule(path).in_features
                plan.packed[path] = [total * block // sum(blocks) for block in blocks]
            else:
                raise ValueError(
                    f"{type(denoiser).__name__}._tp_plan uses {kind} for {path}, which this tool "
                    "does not run; build the plan from the module tree instead"
                )
    for path in [
        path for path, kind in plan.styles.items() if path.endswith(".to_q") and kind == COLWISE
    ]:
        attention = path.rsplit(".", 1)[0]
        attn = denoiser.get_submodule(attention)
        heads, inner = attn.heads, attn.to_q.out_features
        norms = _plan_qk_norms(plan, attention, attn, inner // heads, inner)
        if heads % plan.tp:
            errors.append(
                f"{attention} ({type(attn).__name__}): "
                f"heads={heads} is not divisible by tp={plan.tp}"
            )
        elif norms is not None:
            plan.attention[attention] = heads
            plan.norms.update(norms)
    plan.feedforward = sorted(
        {
            path.rsplit(".net.0.proj", 1)[0] if ".net.0.proj" in path else path
            for path, kind in plan.styles.items()
            if kind == COLWISE and (path.endswith(".net.0.proj") or path.endswith(".proj_mlp"))
        }
    )
    for path in plan.feedforward:
        width = denoiser.get_submodule(
            path + ".net.0.proj" if not path.endswith("proj_mlp") else path
        ).out_features
        if width % plan.tp:
            errors.append(f"{path}: hidden width {width} is not divisible by tp={plan.tp}")


def _permute_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    with torch.no_grad():
        order = order.to(linear.weight.device)
        linear.weight.copy_(linear.weight[order])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[order])


def packed_column_order(blocks: list[int], tp: int) -> torch.Tensor:
    """Input-column order of a Linear reading ``cat([block_0, block_1, ...])`` of column-sharded
    blocks, such that an even split into ``tp`` gives rank r
    [block_0 part r; block_1 part r; ...]."""
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    order = []
    for rank in range(tp):
        for start, width in zip(starts, blocks, strict=True):
            if width % tp:
                raise ValueError(f"packed block width {width} is not divisible by tp={tp}")
            part = width // tp
            order.extend(range(start + rank * part, start + (rank + 1) * part))
    return torch.tensor(order)


def _permute_columns(linear: nn.Linear, order: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(linear.weight[:, order.to(linear.weight.device)])


def _localise_heads(attn: nn.Module, tp: int) -> None:
    """Make the module describe its local shard: processors read ``heads`` (and some
    ``inner_dim // heads``) to reshape the projections."""
    attn.heads = attn.heads // tp
    for name in ("sliceable_head_dim", "inner_dim", "inner_kv_dim"):
        value = getattr(attn, name, None)
        if isinstance(value, int) and value % tp == 0:
            setattr(attn, name, value // tp)


def _styles(plan: TPPlan, dtensor_forward: bool) -> dict[str, Any]:
    if dtensor_forward:
        from torch.distributed.tensor import Replicate

        made = {
            COLWISE: ColwiseParallel,
            ROWWISE: RowwiseParallel,
            GATHERED: lambda: ColwiseParallel(output_layouts=Replicate()),
        }
    else:
        made = {
            COLWISE: LocalColwiseParallel,
            ROWWISE: LocalRowwiseParallel,
            GATHERED: LocalColwiseGather,
        }
    return {path: made[kind]() for path, kind in plan.styles.items()}


def apply_tensor_parallel(
    denoiser: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    dtensor_forward: bool = False,
    permute_gated: bool = True,
    use_model_plan: bool = True,
) -> TPReport:
    """Shard ``denoiser`` in place over the 1-D ``tp_mesh`` (``mesh["tp"]``); a collective-free
    call that every rank of the tp group must make on identical weights, after the denoiser
    is on its device. ``dtensor_forward=True`` runs every sharded Linear through DTensor
    dispatch (torch's stock styles) instead of on its local shard. ``permute_gated=False``
    exists only to show that a plain split of a gated projection is wrong; never use it.
    ``use_model_plan=False`` derives the plan even where the class has a ``_tp_plan``."""
    from torch.distributed.tensor.parallel import parallelize_module

    if tp_mesh.ndim != 1:
        raise ValueError(f"tp_mesh must be 1-D (mesh['tp']), got a {tp_mesh.ndim}-D mesh")
    tp = tp_mesh.size()
    plan = build_tp_plan(denoiser, tp, use_model_plan)  # raises before anything is changed
    before = param_bytes(denoiser)
    if permute_gated:
        for path, half in plan.gated.items():
            _permute_rows(_linear(denoiser, path), gated_row_order(half, tp))
    for path, blocks in plan.packed.items():
        _permute_columns(_linear(denoiser, path), packed_column_order(blocks, tp))
    styles = _styles(plan, dtensor_forward)
    if styles:
        parallelize_module(denoiser, tp_mesh, styles, src_data_rank=None)
    rank, group = tp_mesh.get_local_rank(), tp_mesh.get_group()
    for path in plan.attention:
        attn = denoiser.get_submodule(path)
        slice_full_width_rotary(
            attn, attn.to_q.weight.shape[0], rank, tp
        )  # global rows: DTensor shape
        _localise_heads(attn, tp)
    for path, width in plan.norms.items():
        parent, _, name = path.rpartition(".")
        norm = denoiser.get_submodule(path)
        setattr(denoiser.get_submodule(parent), name, ShardedRMSNorm(norm, width, rank, tp, group))
    for path in plan.convs:
        ffn = denoiser.get_submodule(path)
        shard_conv_ffn(ffn, rank, tp, group, gated_row_order(ffn.conv_point.in_channels, tp))
    return TPReport(
        tp=tp,
        attention=list(plan.attention),
        feedforward=list(plan.feedforward),
        gated=list(plan.gated),
        skipped=dict(plan.skipped),
        param_bytes_before=before,
        param_bytes_after=param_bytes(denoiser),
        modulation=list(plan.modulation),
        norms=list(plan.norms),
        source=plan.source,
    )
