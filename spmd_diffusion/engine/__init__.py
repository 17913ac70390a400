"""The engine layer (rank 0): validation, seeds, batching and the replica scheduler."""

from spmd_diffusion.engine.diffusion_engine import DiffusionEngine

__all__ = ["DiffusionEngine"]
