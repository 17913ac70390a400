"""Running one program on every rank (public name; the code is in
:mod:`spmd_diffusion.entrypoints.spmd`)."""

from spmd_diffusion.entrypoints.spmd import describe_layout, run_spmd, spmd_engine

__all__ = ["describe_layout", "run_spmd", "spmd_engine"]
