"""TorchDistributedExecutor on 2 ranks:
``torchrun --nproc-per-node 2 -m pytest tests/multirank/test_torchrun_executor.py``."""

import pytest
from spmd_checks import *  # noqa: F403 - the shared checks are this module's tests

from spmd_diffusion.distributed.launcher import TORCHRUN, detect_launcher

pytestmark = [
    pytest.mark.skipif(
        detect_launcher().kind != TORCHRUN, reason="needs torchrun --nproc-per-node 2"
    ),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def executor_name():
    return "torchrun"
