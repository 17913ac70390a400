"""The checks ``models/`` owns for options the config and request types carry (LoRA specs,
step-cache specs, quantization kinds), handed to :mod:`spmd_diffusion.option_checks` so the
bottom layer never imports this one. Shapes and names only: no diffusers import."""

from __future__ import annotations

from typing import Any

from spmd_diffusion import option_checks
from spmd_diffusion.models.lora import check_lora_source, parse_loras
from spmd_diffusion.models.quantization import KINDS
from spmd_diffusion.models.step_cache import parse_cache


def check_quantize_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def check_lora_sources(specs: Any) -> None:
    """Rank 0, before any work is sent: every adapter of a request exists or looks like a hub id."""
    for spec in parse_loras(specs):
        check_lora_source(spec.source)


def register_spec_checks() -> None:
    option_checks.register(
        lora=parse_loras,
        lora_sources=check_lora_sources,
        cache=lambda text: str(parse_cache(text)),  # normalised: the kind's default made explicit
        quantize=check_quantize_kind,
    )
