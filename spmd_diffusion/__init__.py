"""spmd_diffusion: SPMD batch inference for diffusers pipelines.

The same program runs on every rank (mpirun, srun, torchrun); rank 0 is the engine.
"""

from __future__ import annotations

__version__ = "0.1.0"

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.models.spec_checks import register_spec_checks
from spmd_diffusion.request import OmniDiffusionRequest

register_spec_checks()  # the config and request types check LoRA/cache/quantize specs through it

__all__ = [
    "DiffusionEngine",
    "DiffusionOutput",
    "OmniDiffusionConfig",
    "OmniDiffusionRequest",
    "__version__",
]
