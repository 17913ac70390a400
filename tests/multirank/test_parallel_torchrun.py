r"""Tensor/CFG parallel correctness under torchrun (hard timeout outside and inside):

    timeout 300 torchrun --nproc-per-node 2 -m pytest -q -p no:cacheprovider \
        tests/multirank/test_parallel_torchrun.py

With ``--nproc-per-node 4`` the same checks run with dp=2 and tp=2 and cfg=2 also combine.
"""

import pytest
from family_checks import *  # noqa: F403 - sequence and CFG parallel on every family
from parallel_checks import *  # noqa: F403 - the shared checks are this module's tests
from parallel_checks import HARD_TIMEOUT

from spmd_diffusion.distributed.launcher import TORCHRUN, detect_launcher

pytestmark = [
    pytest.mark.skipif(
        detect_launcher().kind != TORCHRUN, reason="needs torchrun --nproc-per-node 2"
    ),
    HARD_TIMEOUT,
]


@pytest.fixture(scope="module")
def launch_kind():
    return TORCHRUN
