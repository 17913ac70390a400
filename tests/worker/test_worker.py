"""DiffusionWorker on the tiny models: generation, error isolation, sleep/wake, stats."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from helpers import max_pixel_difference, small_requests

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unet_worker(tiny_unet):
    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-unet"))
    yield worker
    worker.shutdown()


@pytest.fixture(scope="module")
def dit_worker(tiny_dit):
    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-dit"))
    yield worker
    worker.shutdown()


@pytest.mark.parametrize("fixture", ["unet_worker", "dit_worker"])
def test_generate_real_images(request, fixture):
    worker = request.getfixturevalue(fixture)
    output = worker.generate(small_requests(4))
    assert output.ok and output.request_ids == [f"item-{i}" for i in range(4)]
    for images, seeds in zip(output.images, output.seeds, strict=True):
        assert len(images) == 1 and images[0].size == (64, 64) and seeds
    assert output.metadata[0]["num_inference_steps"] == 4 and output.metadata[0]["height"] == 64
    # Different seeds give different images: the model really ran.
    assert max_pixel_difference(output.images[0][0], output.images[1][0]) > 0.01


def test_defaults_are_reported_and_images_per_prompt(unet_worker):
    request = OmniDiffusionRequest(
        prompt="x", seed=1, num_inference_steps=2, num_images_per_prompt=3
    )
    output = unet_worker.generate([request])
    assert output.ok and len(output.images[0]) == 3 and output.seeds[0] == [1, 2, 3]
    assert output.metadata[0]["height"] == 64 and output.metadata[0]["guidance_scale"] == 7.5
    # image k is seeded seed + k: image 1 equals image 0 of a request seeded 2
    alone = unet_worker.generate([OmniDiffusionRequest(prompt="x", seed=2, num_inference_steps=2)])
    assert max_pixel_difference(alone.images[0][0], output.images[0][1]) <= 1 / 255


def test_one_bad_request_does_not_lose_the_others(unet_worker):
    good = small_requests(2)
    bad = OmniDiffusionRequest(
        prompt="x",
        seed=1,
        num_inference_steps=4,
        height=64,
        width=64,
        extra={"no_such_argument": 1},
        request_id="bad",
    )
    clash = OmniDiffusionRequest(
        prompt="y",
        seed=2,
        num_inference_steps=4,
        height=64,
        width=64,
        extra={"guidance_rescale": "oops"},
        request_id="clash",
    )
    output = unet_worker.generate([good[0], bad, clash, good[1]])
    assert output.errors[0] is None and output.errors[3] is None
    assert "does not accept no_such_argument" in output.errors[1]
    assert output.errors[2] is not None and output.images[2] == []
    assert len(output.images[0]) == 1 and len(output.images[3]) == 1
    assert unet_worker.get_cache_stats()["requests_failed"] >= 2


def test_float_output_type(dit_worker):
    request = small_requests(1, extra={"output_type": "np"})[0]
    image = dit_worker.generate([request]).images[0][0]
    assert (
        isinstance(image, np.ndarray)
        and image.shape == (64, 64, 3)
        and 0 <= image.min() <= image.max() <= 1
    )


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_then_wake_gives_the_same_image(unet_worker, level):
    request = small_requests(1)
    before = unet_worker.generate(request).images[0][0]
    assert unet_worker.sleep(level)["sleep_level"] == level
    assert unet_worker.check_health()["status"] == "asleep"
    with pytest.raises(RuntimeError, match="asleep"):
        unet_worker.generate(request)
    if level == 2:
        assert (
            unet_worker.pipeline is None and unet_worker.get_cache_stats()["parameter_bytes"] == 0
        )
    unet_worker.wake_up(["weights"])
    after = unet_worker.generate(request).images[0][0]
    assert np.array_equal(np.asarray(before), np.asarray(after))


def test_sleep_and_wake_reject_bad_arguments(unet_worker):
    with pytest.raises(ValueError, match="sleep level"):
        unet_worker.sleep(3)
    with pytest.raises(ValueError, match="unknown wake_up tag"):
        unet_worker.wake_up(["kv_cache"])


def test_stats_health_and_idempotent_shutdown(tiny_unet):
    worker = DiffusionWorker(OmniDiffusionConfig(model=tiny_unet, torch_num_threads=1))
    stats = worker.get_cache_stats()
    assert stats["parameter_bytes"] > 0 and stats["device"] == "cpu" and stats["dtype"] == "float32"
    assert worker.check_health()["status"] == "ok"
    worker.shutdown()
    worker.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.check_health()


@pytest.mark.slow
@pytest.mark.parametrize("release", ["shutdown", "sleep2"])
def test_releasing_the_pipeline_frees_the_denoiser(tiny_dit, release):
    """No reference survives: not the pipeline, the step cache's hooks, the adapters' pipeline,
    or the denoiser itself (weakrefs are dead after a collection)."""

    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-dit", dtype="float32", cache="pab"))
    assert worker.generate(small_requests(1, num_inference_steps=2)).ok
    refs = [
        weakref.ref(worker.denoiser),
        weakref.ref(worker.pipeline),
        weakref.ref(worker.pipeline.vae),
    ]
    if release == "shutdown":
        worker.shutdown()
    else:
        worker.sleep(2)
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]
    if release == "sleep2":
        worker.wake_up()
        assert worker.generate(small_requests(1, num_inference_steps=2)).ok
