"""Sequence parallelism (Ulysses, ring, or both: USP) through diffusers' context parallel.

The image (or video) tokens of one sample are split across the ``ring x ulysses`` ranks of a
replica by diffusers' own context-parallel hooks (``apply_context_parallel`` with a plan:
which module inputs/outputs to split and where to gather), and every self- or joint
attention runs over the whole sequence: Ulysses re-splits the sequence into heads with an
all-to-all, ring passes key/value chunks around. The config and mesh are diffusers'
``ContextParallelConfig`` over the tool's own device mesh (its "ring" and "ulysses" dims).

Plans, per denoiser class (:data:`PLANS`):

- diffusers' own ``_cp_plan`` and attention processors: Flux, Flux2, Wan (text not split);
- diffusers' plan without its text split: LTX (its cross-attention mask cannot follow a split
  text), cross-attention stays local (queries local, whole text keys);
- the tool's own plans and processors (:mod:`.sp_processors`): SD3/SD3.5 and Qwen-Image
  (joint attention, text whole on every rank: no text length divides by the degree, and a
  masked text cannot be ring-split), PixArt (self-attention), Sana (linear attention with
  all-reduced key-value sums, GLUMBConv with halo rows).

UNets are refused: their convolutions and down/up-sampling mix neighbouring tokens at every
level, so a token split needs halos everywhere and pays little at the sizes they run.

Not applying diffusers' ``enable_parallelism`` keeps two CPU quirks out: it divides by
``torch.accelerator.device_count()`` (0 without an accelerator), and its native attention
backend returns no log-sum-exp for ring attention (:func:`.sp_attention.install_native_lse`).
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch)

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spmd_diffusion.parallel.sp_attention import SequenceGroups, install_native_lse
from spmd_diffusion.parallel.sp_processors import (
    CallCounter,
    JointProcessor,
    LinearAttentionProcessor,
    QwenJointProcessor,
    SelfAttentionProcessor,
    make_hooks,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger(__name__)

OWN, DIFFUSERS = "own", "diffusers"


@dataclass(frozen=True)
class SequencePlan:
    """How one denoiser class runs sequence-parallel.

    ``split``: diffusers ContextParallelModelPlan (built lazily: it needs diffusers' types);
    ``attention``: module-name patterns of the attention modules that must see the whole
    sequence, with the processor factory for each (None: the model's own processor, through
    diffusers' dispatcher with the parallel config); ``ulysses_heads``: True where Ulysses
    splits heads (Sana's linear attention does not); ``why``: a line for the report."""

    split: Callable[[], dict]
    attention: dict[str, Callable | None]
    why: str
    ulysses_heads: bool = True
    sana_hooks: bool = False


def _inputs(**entries: tuple[int, int, bool]) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput

    return {
        name: ContextParallelInput(split_dim=dim, expected_dims=dims, split_output=output)
        for name, (dim, dims, output) in entries.items()
    }


def _output(dim: int, dims: int) -> Any:
    from diffusers.models._modeling_parallel import ContextParallelOutput

    return ContextParallelOutput(gather_dim=dim, expected_dims=dims)


def _split_output_of(module: str, dim: int, dims: int, index: int = 0) -> dict:
    from diffusers.models._modeling_parallel import ContextParallelInput

    return {
        module: {index: ContextParallelInput(split_dim=dim, expected_dims=dims, split_output=True)}
    }


def _model_plan(class_name: str) -> Callable[[], dict]:
    def plan() -> dict:
        import diffusers

        return dict(getattr(diffusers, class_name)._cp_plan)

    return plan


def _ltx_plan() -> dict:
    return {
        "": _inputs(hidden_states=(1, 3, False)),
        "rope": {
            **_split_output_of("rope", 1, 3, 0)["rope"],
            **_split_output_of("rope", 1, 3, 1)["rope"],
        },
        "proj_out": _output(1, 3),
    }


def _patch_plan(embed: str) -> Callable[[], dict]:
    def plan() -> dict:
        return {**_split_output_of(embed, 1, 3), "proj_out": _output(1, 3)}

    return plan


def _qwen_plan() -> dict:
    return {
        "transformer_blocks.0": _inputs(hidden_states=(1, 3, False)),
        "transformer_blocks.*": _inputs(modulate_index=(1, 2, False)),
        **_split_output_of("pos_embed", 0, 2, 0),
        "proj_out": _output(1, 3),
    }


PLANS: dict[str, SequencePlan] = {
    "FluxTransformer2DModel": SequencePlan(
        _model_plan("FluxTransformer2DModel"),
        {"*": None},
        "diffusers' plan: image and text tokens split",
    ),
    "Flux2Transformer2DModel": SequencePlan(
        _model_plan("Flux2Transformer2DModel"),
        {"*": None},
        "diffusers' plan: image and text tokens split",
    ),
    "WanTransformer3DModel": SequencePlan(
        _model_plan("WanTransformer3DModel"),
        {"blocks.*.attn1": None},
        "diffusers' plan: video tokens split, cross-attention local",
    ),
    "LTXVideoTransformer3DModel": SequencePlan(
        _ltx_plan, {"transformer_blocks.*.attn1": None}, "video tokens split, cross-attention local"
    ),
    "SD3Transformer2DModel": SequencePlan(
        _patch_plan("pos_embed"),
        {"transformer_blocks.*.attn": JointProcessor, "transformer_blocks.*.attn2": JointProcessor},
        "own plan: image tokens split, text whole on every rank",
    ),
    "QwenImageTransformer2DModel": SequencePlan(
        _qwen_plan,
        {"transformer_blocks.*.attn": QwenJointProcessor},
        "own plan: image tokens split, masked text whole on every rank",
    ),
    "PixArtTransformer2DModel": SequencePlan(
        _patch_plan("pos_embed"),
        {"transformer_blocks.*.attn1": SelfAttentionProcessor},
        "own plan: image tokens split, cross-attention local",
    ),
    "SanaTransformer2DModel": SequencePlan(
        _patch_plan("patch_embed"),
        {"transformer_blocks.*.attn1": LinearAttentionProcessor},
        "own plan: rows of tokens split, linear attention's key-value sums "
        "all-reduced, GLUMBConv with halo rows",
        ulysses_heads=False,
        sana_hooks=True,
    ),
}


def plan_for(class_name: str) -> SequencePlan | None:
    return PLANS.get(class_name)


def refusal(class_name: str, config: dict[str, Any], ulysses: int, ring: int) -> str | None:
    """Why ``--ulysses``/``--ring`` cannot run on a denoiser of this class and config (read
    from its config.json before loading), or None."""
    if class_name.startswith("UNet"):
        return (
            "sequence parallelism splits a transformer's tokens; "
            f"{class_name} is a UNet, whose convolutions "
            "and resampling mix neighbouring tokens at every level: "
            "use data parallel (more ranks) or --tp"
        )
    plan = plan_for(class_name)
    if plan is None:
        return (
            f"{class_name} has no sequence-parallel plan "
            f"(plans exist for {', '.join(sorted(PLANS))})"
        )
    heads = config.get("num_attention_heads")
    if ulysses > 1 and plan.ulysses_heads and isinstance(heads, int) and heads % ulysses:
        return f"--ulysses {ulysses} splits attention heads, and {class_name} has {heads} heads"
    return None


@dataclass
class SPReport:
    """What :func:`enable_sequence_parallel` did, and how many attention calls ran over the
    whole sequence since (``counter``)."""

    ulysses: int
    ring: int
    denoiser: str
    plan: str
    attention_modules: int
    counter: CallCounter = field(default_factory=CallCounter, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "ulysses": self.ulysses,
            "ring": self.ring,
            "degree": self.ulysses * self.ring,
            "plan": self.plan,
            "attention_modules": self.attention_modules,
            "sequence_parallel_attention_calls": self.counter.calls,
        }

    def summary(self) -> str:
        return (
            f"sequence parallel ulysses={self.ulysses} ring={self.ring} "
            f"on {self.denoiser}: {self.plan}; "
            f"{self.attention_modules} attention modules see the whole sequence"
        )


def sequence_groups(context: Any) -> SequenceGroups:
    """The ring, ulysses and flattened (ring x ulysses: the order diffusers' hooks split the
    sequence in) groups of this rank's replica, from a set-up ``ContextParallelConfig``."""
    ulysses, ring, flat = context._ulysses_mesh, context._ring_mesh, context._flattened_mesh
    return SequenceGroups(
        ulysses=ulysses.get_group(),
        ulysses_size=ulysses.size(),
        ulysses_rank=ulysses.get_local_rank(),
        ring=ring.get_group(),
        ring_size=ring.size(),
        ring_rank=ring.get_local_rank(),
        flat=flat.get_group(),
        flat_size=flat.size(),
        flat_rank=flat.get_local_rank(),
    )


def _matching(denoiser: Any, pattern: str) -> list[tuple[str, Any]]:
    return [
        (name, module)
        for name, module in denoiser.named_modules()
        if name and fnmatch.fnmatchcase(name, pattern) and hasattr(module, "processor")
    ]


def _diffusers_config(
    mesh: DeviceMesh, ulysses: int, ring: int, rank: int, world: int, device: Any
) -> Any:
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    context = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, mesh=mesh)
    config = ParallelConfig(context_parallel_config=context)
    config.setup(rank, world, device, mesh=mesh)
    return config


def enable_sequence_parallel(denoiser: Any, mesh: DeviceMesh, ulysses: int, ring: int) -> SPReport:
    """Split ``denoiser``'s tokens over the replica's ``ring x ulysses`` ranks, in place.
    Every rank of the replica must call it, on identical weights, after the denoiser is on
    its device; then every rank must make the same pipeline calls."""
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel

    name = type(denoiser).__name__
    plan = plan_for(name)
    problem = refusal(name, dict(getattr(denoiser, "config", {}) or {}), ulysses, ring)
    if problem is not None or plan is None:
        raise ValueError(problem)
    # diffusers' hooks still call the name torch deprecated; the warning would repeat every step.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_tensor. is deprecated", category=FutureWarning
    )
    device = next(denoiser.parameters()).device
    config = _diffusers_config(mesh, ulysses, ring, dist.get_rank(), dist.get_world_size(), device)
    groups = sequence_groups(config.context_parallel_config)
    if ring > 1:
        install_native_lse()
    report = SPReport(ulysses, ring, name, plan.why, 0)
    for pattern, processor in plan.attention.items():
        for _, module in _matching(denoiser, pattern):
            if processor is None:
                if not hasattr(module.processor, "_parallel_config"):
                    continue  # a processor outside diffusers' dispatcher: it would run locally
                module.processor._parallel_config = config
                _count_calls(module, report.counter)
            else:
                module.set_processor(processor(groups, report.counter))
            report.attention_modules += 1
    if plan.sana_hooks:
        _apply_sana_hooks(denoiser, groups)
    denoiser._parallel_config = config
    apply_context_parallel(denoiser, config.context_parallel_config, plan.split())
    return report


def _count_calls(module: Any, counter: CallCounter) -> None:
    from diffusers.hooks import HookRegistry, ModelHook

    class CountHook(ModelHook):
        _is_stateful = False

        def pre_forward(self, module: Any, *args: Any, **kwargs: Any):
            counter.calls += 1
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(module).register_hook(CountHook(), "spmd_sp_count")


def _apply_sana_hooks(denoiser: Any, groups: SequenceGroups) -> None:
    from diffusers.hooks import HookRegistry

    height_hook, halo_hook = make_hooks(groups)
    for block in denoiser.transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            height_hook(), "spmd_sp_local_height"
        )
        conv = block.ff.conv_depth
        HookRegistry.check_if_exists_or_initialize(conv).register_hook(halo_hook(), "spmd_sp_halo")
