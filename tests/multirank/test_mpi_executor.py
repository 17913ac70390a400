"""MPIExecutor on 2 ranks:
``mpiexec -n 2 python -m pytest --with-mpi tests/multirank/test_mpi_executor.py``."""

import pytest
from spmd_checks import *  # noqa: F403 - the shared checks are this module's tests

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def executor_name():
    return "mpi"
