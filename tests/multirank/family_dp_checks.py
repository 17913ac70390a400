"""Data parallel on every embedded family through the real engine (shared by the MPI and
torchrun modules): a 2-rank SPMD engine per family, 8 requests in batches of 2 spread over
both replicas, byte-identical to the in-process ``uni`` executor's images. One launch runs
every family (the engines are built and closed one after the other on every rank)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import small_requests

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.entrypoints.spmd import spmd_engine
from spmd_diffusion.executor import UniProcDiffusionExecutor

FAMILIES = (
    "tiny-unet",
    "tiny-sdxl",
    "tiny-dit",
    "tiny-sd3",
    "tiny-flux",
    "tiny-qwen-image",
    "tiny-sana",
    "tiny-video",
    "tiny-ltx",
)


@pytest.fixture(scope="module", params=FAMILIES)
def family_engine(request, executor_name):
    """The family's engine on rank 0; the other rank serves it inside this fixture until rank 0
    closes it (then sees None), so every rank builds and closes the engines in step."""

    config = OmniDiffusionConfig(
        model=request.param, executor_class=executor_name, max_batch_size=2
    )
    with spmd_engine(config) as engine:
        yield engine


def arrays(outputs) -> list[np.ndarray]:
    return [np.asarray(image) for output in outputs for images in output.images for image in images]


def test_every_family_runs_data_parallel_with_the_one_rank_images(family_engine):

    if family_engine is None:
        pytest.skip("checked on rank 0 (this rank served the calls)")
    requests = small_requests(8, num_inference_steps=2)
    outputs = family_engine.generate(requests)
    assert all(output.ok for output in outputs), [output.errors for output in outputs]
    assert {output.rank for output in outputs} == {0, 1}, "both replicas made images"
    reference = UniProcDiffusionExecutor(
        family_engine.od_config.__class__(
            **{**family_engine.od_config.to_dict(), "executor_class": "uni"}
        )
    )
    try:
        expected = reference.execute_model(requests).split()
    finally:
        reference.shutdown()
    assert all(np.array_equal(a, b) for a, b in zip(arrays(expected), arrays(outputs), strict=True))
