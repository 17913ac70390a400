"""Where a pipeline comes from: the embedded tiny models, local directories and hub ids,
all loaded through diffusers' own ``from_pretrained``."""

from spmd_diffusion.models.loader import (
    HUB_ID,
    TINY_MODELS,
    cache_root,
    check_model_reference,
    ensure_tiny_model,
    load_pipeline,
    pipeline_class,
    resolve_model_path,
)

__all__ = [
    "HUB_ID",
    "TINY_MODELS",
    "cache_root",
    "check_model_reference",
    "ensure_tiny_model",
    "load_pipeline",
    "pipeline_class",
    "resolve_model_path",
]
