"""The worker layer: one DiffusionWorker per rank owns a diffusers pipeline."""

from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

__all__ = ["DiffusionWorker"]
