"""``python -m spmd_diffusion`` is ``omni-diffuse`` (handy under torchrun:
``-m spmd_diffusion``)."""

from spmd_diffusion.entrypoints.cli import main

if __name__ == "__main__":
    main()
