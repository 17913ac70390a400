"""Multi-rank fixtures. These tests run on every rank of a real launch:

    mpiexec -n 2 python -m pytest --with-mpi tests/multirank/test_mpi_executor.py
    torchrun --nproc-per-node 2 -m pytest tests/multirank/test_torchrun_executor.py

Rank 0 holds the engine and does every assert; the other ranks serve it from inside the
``engine`` fixture until rank 0 closes it at module teardown (even after a failure), then
see ``engine is None``. So no rank is ever left waiting in a collective the others skipped,
and a failure shows in rank 0's exit status, which the launcher reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.entrypoints.spmd import spmd_engine

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/helpers.py


@pytest.fixture(scope="module")
def engine(executor_name):

    with spmd_engine(
        OmniDiffusionConfig(model="tiny-unet", executor_class=executor_name)
    ) as engine:
        yield engine


@pytest.fixture
def root_engine(engine):
    """The engine on rank 0; other ranks have already served every test and skip."""
    if engine is None:
        pytest.skip("checked on rank 0 (this rank served the calls)")
    return engine
