"""Control planes: how rank 0 reaches the other ranks of an SPMD job.

One per launcher family: MPI (mpi4py, shared-memory messages of about a microsecond) and
torch.distributed (a gloo CPU group, for torchrun and for srun without a usable MPI).
The RPC tuples and replies of the SPMD executors travel here; tensors never do.
"""

from spmd_diffusion.distributed.control.base import Backoff, ControlPlane, LaunchError, get_control_plane

__all__ = ["Backoff", "ControlPlane", "LaunchError", "get_control_plane"]
