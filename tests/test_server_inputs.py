"""The server checks a request as the CLI does before loading: input images a pipeline needs
or does not take, ``extra`` arguments it does not name; every mistake a 400 in OpenAI's error
shape, never a 200 with the error inside. Inputs are sized as on the CLI. A server whose
engine is shut down says so on /health."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.server import serve
from test_server import KEY, call

pytestmark = pytest.mark.slow


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> dict:
    pixels = np.random.RandomState(seed).rand(height, width, 3 if mode == "RGB" else 1) * 255
    image = Image.fromarray(pixels.astype(np.uint8).squeeze())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"format": "png", "data": base64.b64encode(buffer.getvalue()).decode()}


def start(class_name: str | None):
    engine = AsyncDiffusionEngine(OmniDiffusionConfig(executor_class="uni", model_class_name=class_name,
                                                      max_batch_size=4), max_wait_s=0.0)
    return serve(engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny-unet").start()


@pytest.fixture(scope="module")
def inpainting(tiny_unet):
    http = start("StableDiffusionInpaintPipeline")
    yield http
    http.shutdown()
    http.server_close()


@pytest.fixture(scope="module")
def text_to_image(tiny_unet):
    http = start(None)
    yield http
    http.shutdown()
    http.server_close()


def item(**fields) -> dict:
    return {"prompt": "a cat", "seed": 1, "num_inference_steps": 2, **fields}


def test_an_inpainting_output_has_its_inputs_size_as_on_the_cli(inpainting):
    status, answer = call(inpainting.url + "/v1/diffusion/generate",
                          {"requests": [item(image=png(20, 20), mask_image=png(20, 20, "L", 1))]})
    assert status == 200 and answer["errors"] == [None], answer
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0][0]["data"])))
    assert image.size == (16, 16)  # rounded down to the VAE's multiple of 8, not the model's 64x64


@pytest.mark.parametrize("fields", [{}, {"image": png(32, 32)}], ids=["no-image", "no-mask"])
def test_an_inpainting_item_without_its_inputs_is_a_400(inpainting, fields):
    status, answer = call(inpainting.url + "/v1/diffusion/generate", {"requests": [item(**fields)]})
    assert status == 400, answer
    message = answer["error"]["message"]
    assert "StableDiffusionInpaintPipeline needs" in message and "mask_image" in message, message


def test_the_openai_route_to_an_inpainting_server_without_an_image_is_a_400(inpainting):
    status, answer = call(inpainting.url + "/v1/images/generations", {"prompt": "a cat", "size": "32x32"})
    assert status == 400 and "needs image and mask_image" in answer["error"]["message"], answer


@pytest.mark.parametrize("fields, message", [
    ({"image": png(32, 32)}, "takes no image"),
    ({"extra": {"not_an_argument": 3}}, "takes no argument 'not_an_argument'"),
], ids=["image-for-text-to-image", "unknown-extra"])
def test_what_the_pipeline_does_not_take_is_a_400(text_to_image, fields, message):
    status, answer = call(text_to_image.url + "/v1/diffusion/generate", {"requests": [item(), item(**fields)]})
    assert status == 400, answer
    assert answer["error"]["message"].startswith("requests[1]: ") and message in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"


def test_health_is_503_once_the_engine_is_shut_down(tiny_unet):
    http = start(None)
    try:
        assert call(http.url + "/health", key=None) == (200, {"status": "ok"})
        http.engine.close()  # the executor is gone; the HTTP server still answers
        status, answer = call(http.url + "/health", key=None)
        assert status == 503 and answer == {"status": "error", "error": "the engine is shut down"}
    finally:
        http.shutdown()
        http.server_close()
