"""Model options applied after loading, each through diffusers' or torch's own API: scheduler,
LoRA, VAE tiling/slicing, the attention backend, CPU offload (instead of moving the pipeline
to the device), ``torch.compile`` of the denoiser.

``check_model_options`` runs on rank 0 before any model loads (a bad name is exit 2);
``place_pipeline`` and ``compile_denoiser`` run on every worker.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch); project modules load
# where used (models.loader, models.lora, models.quantization, models.schedulers, models.step_cache,
# parallel.sequence_parallel, parallel.vae_parallel): they pull in heavy modules or import back into
# this one

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)


def check_attention_backend(name: str) -> None:
    """A backend diffusers' attention dispatcher knows, whose packages are installed."""
    try:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
        )
    except ImportError:
        raise ValueError(
            "attention_backend needs diffusers' attention dispatcher (diffusers >= 0.35); "
            "this diffusers has none"
        ) from None
    names = sorted(
        member.value for member in AttentionBackendName if not member.value.startswith("_")
    )
    try:
        backend = AttentionBackendName(name.lower())
    except ValueError:
        raise ValueError(
            f"attention_backend {name!r} is not one of diffusers' backends: {', '.join(names)}"
        ) from None
    try:
        _check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as exc:
        raise ValueError(f"attention_backend {name!r} cannot run here: {exc}") from None


def check_model_options(config: Any) -> None:
    """Everything about the model options that can be known before loading: the scheduler
    and its options, LoRA paths, the attention backend, an accelerator for offload."""
    from spmd_diffusion.models.loader import check_pipeline_class
    from spmd_diffusion.models.lora import check_lora_source, parse_loras
    from spmd_diffusion.models.schedulers import check_scheduler

    check_pipeline_class(config.model_class_name)
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {config.device}: this machine has no CUDA device "
                "(use --device cpu or auto)"
            )
    if config.scheduler is not None:
        check_scheduler(config.scheduler, config.scheduler_options)
    for spec in parse_loras(config.lora):
        check_lora_source(spec.source)
    if config.attention_backend is not None:
        check_attention_backend(config.attention_backend)
    if config.cache is not None:
        from spmd_diffusion.models.loader import declared_pipeline_class, denoiser_config
        from spmd_diffusion.models.step_cache import check_cache_for_pipeline, parse_cache

        denoiser = denoiser_config(config.model)
        check_cache_for_pipeline(
            parse_cache(config.cache),
            declared_pipeline_class(config.model, config.model_class_name),
            denoiser[0] if denoiser else None,
        )
    if config.ulysses_degree * config.ring_degree > 1:
        check_sequence_parallel(config)
    if config.vae_parallel:
        check_vae_parallel(config)
    if config.quantize is not None:
        check_quantize(config)
    if config.offload is not None:
        import torch

        if not torch.cuda.is_available():
            # diffusers refuses too ("requires accelerator, but not found"), but only after loading.
            raise ValueError(
                f"--offload {config.offload} moves models between the CPU and a GPU, "
                "and this machine has none: on a CPU the whole pipeline already lives "
                "in host memory, run without it"
            )


def check_sequence_parallel(config: Any) -> None:
    """--ulysses/--ring on this model: a denoiser with a sequence-parallel plan, whose heads
    divide by tp x ulysses (read from its config.json; a hub id is checked when it loads)."""
    from spmd_diffusion.models.loader import denoiser_config
    from spmd_diffusion.parallel.sequence_parallel import refusal

    found = denoiser_config(config.model)
    if found is None:
        return
    name, denoiser = found
    flags = " ".join(
        f"--{flag} {value}"
        for flag, value in (("ulysses", config.ulysses_degree), ("ring", config.ring_degree))
        if value > 1
    )
    problem = refusal(name, denoiser, config.ulysses_degree, config.ring_degree)
    heads = denoiser.get("num_attention_heads")
    if (
        problem is None
        and config.tensor_parallel_size > 1
        and isinstance(heads, int)
        and heads % (config.tensor_parallel_size * config.ulysses_degree)
    ):
        problem = (
            f"--tp {config.tensor_parallel_size} x --ulysses {config.ulysses_degree} "
            f"split attention heads, and {name} has {heads} heads"
        )
    if problem is not None:
        raise ValueError(f"{flags}: {problem}")


def check_quantize(config: Any) -> None:
    """--quantize: its package installed, the components the pipeline's, and a probe of the
    kind on the job's device (a kind this machine cannot run is refused with the reason)."""
    import torch

    from spmd_diffusion.models.loader import component_names
    from spmd_diffusion.models.quantization import check_kind, probe, resolve_components

    check_kind(config.quantize)
    available = component_names(config.model)
    if available is not None:
        resolve_components(config.quantize_components, available)
    wants_gpu = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    probe(config.quantize, "cuda" if wants_gpu else "cpu")


def check_vae_parallel(config: Any) -> None:
    """--vae-parallel on this model's VAE (its class read from vae/config.json)."""
    from spmd_diffusion.models.loader import component_config
    from spmd_diffusion.parallel.vae_parallel import vae_refusal

    found = component_config(config.model, "vae")
    problem = vae_refusal(found[0] if found else None)
    if problem is not None:
        raise ValueError(problem)


def denoiser_of(pipeline: Any, use: str = "denoise") -> tuple[str, Any]:
    """(attribute name, module) of the network that runs every step: the UNet or the
    transformer. ValueError, saying what it was wanted for (``use``), when there is none."""
    for name in ("unet", "transformer"):
        module = getattr(pipeline, name, None)
        if module is not None:  # not ``a or b``: a compiled module has no truth value
            return name, module
    raise ValueError(f"{use}: {type(pipeline).__name__} has no unet or transformer to {use}")


def apply_model_options(pipeline: Any, config: Any) -> dict[str, Any]:
    """Scheduler, VAE tiling/slicing and attention backend, before the pipeline is placed
    (LoRA adapters come from :class:`spmd_diffusion.models.lora.LoraAdapters`). Returns what
    was done, for the worker's stats."""
    from spmd_diffusion.models.schedulers import set_scheduler

    report: dict[str, Any] = {}
    if config.scheduler is not None:
        set_scheduler(pipeline, config.scheduler, config.scheduler_options)
    report["scheduler"] = type(getattr(pipeline, "scheduler", None)).__name__
    vae = getattr(pipeline, "vae", None)
    for flag, method in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if getattr(config, flag):
            if vae is None or not hasattr(vae, method):
                raise ValueError(f"{flag}: {type(pipeline).__name__} has no VAE that supports it")
            getattr(vae, method)()
    if config.attention_backend is not None:
        report["attention_modules"] = set_attention_backend(pipeline, config.attention_backend)
    return report


def set_attention_backend(pipeline: Any, backend: str) -> int:
    """diffusers' ``set_attention_backend`` on every model component; returns how many
    attention modules the dispatcher now drives (0: the model's attention processors do not
    go through the dispatcher, so the backend changes nothing for it -- said in a warning)."""
    import torch

    taken = 0
    for _name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and hasattr(component, "set_attention_backend"):
            component.set_attention_backend(backend)
            taken += sum(
                1
                for module in component.modules()
                if getattr(getattr(module, "processor", None), "_attention_backend", None)
                is not None
            )
    if not taken:
        logger.warning(
            "attention backend %s: no attention module of %s uses diffusers' dispatcher, "
            "so it runs as before",
            backend,
            type(pipeline).__name__,
        )
    return taken


def place_pipeline(pipeline: Any, config: Any, device: Any) -> Any:
    """Move the pipeline to ``device``, or hand placement to diffusers' CPU offload."""
    if config.offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
        return pipeline
    if config.offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
        return pipeline
    if config.offload == "group":
        # Groups of blocks moved to the GPU just before they run, on a side CUDA stream so
        # the copy of the next group overlaps the compute of this one.
        pipeline.enable_group_offload(
            onload_device=device,
            offload_device="cpu",
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
        return pipeline
    return pipeline.to(device)


def compile_denoiser(pipeline: Any) -> None:
    """``torch.compile`` the denoiser (compiled lazily, on its first call per input shape)."""
    import torch

    name, module = denoiser_of(pipeline, "compile")
    setattr(pipeline, name, torch.compile(module))


def compile_seconds() -> float:
    """Seconds this process has spent compiling with torch.compile (dynamo + inductor)."""

    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0.0
    metrics = getattr(utils, "compilation_time_metrics", {})
    return float(sum(metrics.get("_compile.compile_inner", ())))
