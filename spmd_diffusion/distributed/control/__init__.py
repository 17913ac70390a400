"""Control planes: how rank 0 reaches the other ranks of an SPMD job.

One per launcher family: MPI (mpi4py point-to-point, shared-memory messages of about a
microsecond) and torch.distributed (a gloo CPU group, for torchrun and for srun without a
usable MPI). The RPC requests and replies of the SPMD executors travel here; tensors never do.
"""

from spmd_diffusion.distributed.control.base import (
    Backoff,
    ControlPlane,
    RootChannel,
    get_control_plane,
)
from spmd_diffusion.errors import LaunchError

__all__ = ["Backoff", "ControlPlane", "LaunchError", "RootChannel", "get_control_plane"]
