"""A worker's model setup: one ordered list of steps, the order checked in code.

Each step acts on what the steps before it left, and several patch the denoiser's forward
with diffusers hooks (:mod:`spmd_diffusion.models.hooks`), where the hook registered last
runs outermost. So the order is part of the result: :data:`STEPS` names, for every step,
the steps it must follow and why, and :func:`check_order` refuses a list that breaks one
(it runs on :data:`STEPS` at import). Each step does nothing when its option is off.
"""

# ruff: noqa: PLC0415 - each step imports the heavy module (diffusers, torch) it needs

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.models import load_pipeline

logger = logging.getLogger(__name__)


@dataclass
class ModelSetup:
    """What the steps share: the inputs, and what they produce for the worker."""

    config: OmniDiffusionConfig
    device: Any
    dtype: Any
    parallel: Any = None  # the worker's parallel groups (layout and mesh), None without
    pipeline: Any = None
    adapters: Any = None
    model_report: dict[str, Any] = field(default_factory=dict)
    parallel_report: Any = None
    step_cache: Any = None
    quantized_components: list[str] | None = None


@dataclass(frozen=True)
class Step:
    """One setup step: ``run`` after every step named in ``after`` (``why``: the reason)."""

    name: str
    run: Callable[[ModelSetup], None]
    after: tuple[str, ...] = ()
    why: str = ""


def check_order(steps: Sequence[Step]) -> None:
    """ValueError when a step comes before a step it must follow, or a name repeats."""
    seen: set[str] = set()
    for step in steps:
        missing = [name for name in step.after if name not in seen]
        if missing:
            raise ValueError(
                f"setup step {step.name!r} must come after {', '.join(missing)}: {step.why}"
            )
        if step.name in seen:
            raise ValueError(f"setup step {step.name!r} is listed twice")
        seen.add(step.name)


def _quantization_config(setup: ModelSetup) -> Any:
    """diffusers' PipelineQuantizationConfig for ``--quantize`` (None without it)."""
    config = setup.config
    if config.quantize is None:
        return None
    from spmd_diffusion.models.loader import component_names
    from spmd_diffusion.models.quantization import pipeline_config, resolve_components

    available = component_names(config.model) or [
        "transformer",
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    ]
    components = resolve_components(config.quantize_components, available)
    setup.quantized_components = components
    return pipeline_config(config.quantize, components)


def _load(setup: ModelSetup) -> None:
    config = setup.config
    setup.pipeline = load_pipeline(
        config.model,
        config.model_class_name,
        setup.dtype,
        revision=config.revision,
        variant=config.variant,
        quantization_config=_quantization_config(setup),
    )


def _options(setup: ModelSetup) -> None:
    from spmd_diffusion.models.options import apply_model_options

    setup.model_report = apply_model_options(setup.pipeline, setup.config)


def _lora(setup: ModelSetup) -> None:
    from spmd_diffusion.models.lora import LoraAdapters, parse_loras

    run_loras = parse_loras(setup.config.lora)
    setup.adapters = LoraAdapters(
        setup.pipeline, setup.config.max_loras, tuple(spec.adapter_name for spec in run_loras)
    )
    setup.adapters.activate(run_loras)


def _place(setup: ModelSetup) -> None:
    from spmd_diffusion.models.options import place_pipeline

    setup.pipeline = place_pipeline(setup.pipeline, setup.config, setup.device)


def _tp(setup: ModelSetup) -> None:
    if setup.parallel is None:
        return
    from spmd_diffusion.parallel import parallel_tp, start_parallel

    layout, mesh = setup.parallel.layout, setup.parallel.mesh
    setup.parallel_report = start_parallel(setup.pipeline, layout, mesh)
    parallel_tp(setup.pipeline, setup.parallel_report, mesh)


def _sp(setup: ModelSetup) -> None:
    if setup.parallel is not None:
        from spmd_diffusion.parallel import parallel_sp

        parallel_sp(setup.pipeline, setup.parallel_report, setup.parallel.mesh)


def _cfg(setup: ModelSetup) -> None:
    if setup.parallel is not None:
        from spmd_diffusion.parallel import parallel_cfg

        parallel_cfg(setup.pipeline, setup.parallel_report, setup.parallel.mesh)


def _vae(setup: ModelSetup) -> None:
    if setup.parallel is None:
        return
    if setup.config.vae_parallel:
        from spmd_diffusion.parallel import parallel_vae

        parallel_vae(setup.pipeline, setup.parallel_report, setup.parallel.mesh)
    logger.info("%s", setup.parallel_report.summary())


def _cache(setup: ModelSetup) -> None:
    config = setup.config
    if config.cache is None:
        return
    from spmd_diffusion.models.step_cache import enable_step_cache

    setup.step_cache = enable_step_cache(
        setup.pipeline, config.cache, guidance_split=config.cfg_parallel
    )
    setup.model_report.update(setup.step_cache.report())


def _batch_invariance(setup: ModelSetup) -> None:
    if setup.config.batch_invariant:
        from spmd_diffusion.worker.batch_invariance import make_batch_invariant

        make_batch_invariant(setup.pipeline)


def _compile(setup: ModelSetup) -> None:
    if setup.config.compile:
        from spmd_diffusion.models.options import compile_denoiser

        compile_denoiser(setup.pipeline)


STEPS: tuple[Step, ...] = (
    Step("load", _load, why="every rank loads its own copy of the weights"),
    Step(
        "options",
        _options,
        ("load",),
        "scheduler, VAE tiling/slicing and attention backend act on the loaded components",
    ),
    Step("lora", _lora, ("options",), "adapters load before placing: they move with the weights"),
    Step("place", _place, ("lora",), "the weights go to their device (or to diffusers' offload)"),
    Step("tp", _tp, ("place",), "each rank shards its own copy, already on its device"),
    Step("sp", _sp, ("tp",), "context parallel's hooks wrap the sharded blocks"),
    Step(
        "cfg",
        _cfg,
        ("sp",),
        "the CFG split of the batch wraps the sequence split and the sharded forward",
    ),
    Step("vae", _vae, ("cfg",), "the parallel report is complete after the denoiser's modes"),
    Step(
        "cache",
        _cache,
        ("tp", "sp", "cfg"),
        "the cache hooks wrap the sharded blocks inside CFG's split, and its timestep probe "
        "sees the whole call",
    ),
    Step(
        "batch_invariance",
        _batch_invariance,
        ("cache",),
        "the row loop runs outside every other hook, so each row sees the whole stack",
    ),
    Step(
        "compile",
        _compile,
        ("place", "tp", "sp", "cfg", "cache", "batch_invariance"),
        "last: torch.compile traces the layers as patched above",
    ),
)
check_order(STEPS)


def set_up_model(setup: ModelSetup, steps: Sequence[Step] = STEPS) -> ModelSetup:
    """Run ``steps`` in order on ``setup`` (after checking the order); returns ``setup``."""
    check_order(steps)
    for step in steps:
        step.run(setup)
    return setup
