"""Every family, data parallel under torchrun --nproc-per-node 2: see family_dp_checks."""

import pytest
from family_dp_checks import *  # noqa: F403 - the shared checks are this module's tests

from spmd_diffusion.distributed.launcher import TORCHRUN, detect_launcher

pytestmark = [
    pytest.mark.skipif(
        detect_launcher().kind != TORCHRUN, reason="needs torchrun --nproc-per-node 2"
    ),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def executor_name():
    return "torchrun"
