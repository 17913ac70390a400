"""Every family, data parallel under mpiexec -n 2 (pytest-mpi): see family_dp_checks."""

import pytest
from family_dp_checks import *  # noqa: F403 - the shared checks are this module's tests

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def executor_name():
    return "mpi"
