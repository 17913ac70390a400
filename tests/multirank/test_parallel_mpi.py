r"""Tensor/CFG parallel correctness under mpiexec (pytest-mpi; hard timeout outside and inside):

    timeout 300 mpiexec -n 2 python -m pytest -q -p no:cacheprovider --with-mpi \
        tests/multirank/test_parallel_mpi.py

torch.distributed is initialised here from MPI: rank and size from mpi4py, MASTER_ADDR
127.0.0.1 and a MASTER_PORT chosen by rank 0 and broadcast with mpi4py, gloo backend.
"""

import pytest
from family_checks import *  # noqa: F403 - sequence and CFG parallel on every family
from parallel_checks import *  # noqa: F403 - the shared checks are this module's tests
from parallel_checks import HARD_TIMEOUT

from spmd_diffusion.distributed.launcher import MPI

pytestmark = [pytest.mark.mpi(min_size=2), HARD_TIMEOUT]


@pytest.fixture(scope="module")
def launch_kind():
    return MPI
