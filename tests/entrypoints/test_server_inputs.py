"""The server checks a request as the CLI does before loading: input images a pipeline needs
or does not take, ``extra`` arguments it does not name; every mistake a 400 in OpenAI's error
shape, never a 200 with the error inside. Inputs are sized as on the CLI. A server whose
engine is shut down says so on /health."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image
from serving import KEY, call

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.server import serve

openai = pytest.importorskip("openai", reason="the test extra installs openai")

pytestmark = pytest.mark.slow


def png(width: int, height: int, mode: str = "RGB", seed: int = 0) -> dict:
    pixels = np.random.RandomState(seed).rand(height, width, 3 if mode == "RGB" else 1) * 255
    image = Image.fromarray(pixels.astype(np.uint8).squeeze())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"format": "png", "data": base64.b64encode(buffer.getvalue()).decode()}


@contextlib.contextmanager
def served(class_name: str | None):
    """A server of the tiny UNet loaded as ``class_name``, shut down afterwards."""
    engine = AsyncDiffusionEngine(
        OmniDiffusionConfig(executor_class="uni", model_class_name=class_name, max_batch_size=4),
        max_wait_s=0.0,
    )
    http = serve(engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny-unet").start()
    try:
        yield http
    finally:
        http.shutdown()
        http.server_close()


@pytest.fixture(scope="module")
def inpainting(tiny_unet):
    with served("StableDiffusionInpaintPipeline") as http:
        yield http


@pytest.fixture(scope="module")
def text_to_image(tiny_unet):
    with served(None) as http:
        yield http


def item(**fields) -> dict:
    return {"prompt": "a cat", "seed": 1, "num_inference_steps": 2, **fields}


def test_an_inpainting_output_has_its_inputs_size_as_on_the_cli(inpainting):
    status, answer = call(
        inpainting.url + "/v1/diffusion/generate",
        {"requests": [item(image=png(20, 20), mask_image=png(20, 20, "L", 1))]},
    )
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
    status, answer = call(
        inpainting.url + "/v1/images/generations", {"prompt": "a cat", "size": "32x32"}
    )
    assert status == 400 and "needs image and mask_image" in answer["error"]["message"], answer


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image": png(32, 32)}, "takes no image"),
        ({"extra": {"not_an_argument": 3}}, "takes no argument 'not_an_argument'"),
    ],
    ids=["image-for-text-to-image", "unknown-extra"],
)
def test_what_the_pipeline_does_not_take_is_a_400(text_to_image, fields, message):
    status, answer = call(
        text_to_image.url + "/v1/diffusion/generate", {"requests": [item(), item(**fields)]}
    )
    assert status == 400, answer
    assert (
        answer["error"]["message"].startswith("requests[1]: ")
        and message in answer["error"]["message"]
    ), answer
    assert answer["error"]["type"] == "invalid_request_error"


def test_health_is_503_once_the_engine_is_shut_down(tiny_unet):
    with served(None) as http:
        assert call(http.url + "/health", key=None) == (200, {"status": "ok"})
        http.engine.close()  # the executor is gone; the HTTP server still answers
        status, answer = call(http.url + "/health", key=None)
        assert status == 503 and answer == {"status": "error", "error": "the engine is shut down"}


# -- POST /v1/images/edits -------------------------------------------------------------------


@pytest.fixture(scope="module")
def img2img(tiny_unet):
    with served("StableDiffusionImg2ImgPipeline") as http:
        yield http


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(height, width, 3) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_openai_client_edits_with_an_alpha_mask_as_diffusers_would_with_a_white_one(inpainting):
    """OpenAI's mask (transparent = edit) gives the pixels of diffusers' mask (white = edit)
    on the native route: same item, same seed."""
    client = openai.OpenAI(base_url=inpainting.url + "/v1", api_key=KEY)
    alpha = np.full((32, 32), 255, dtype=np.uint8)
    alpha[:, :16] = 0  # edit the left half
    rgba = Image.fromarray(np.dstack([np.zeros((32, 32, 3), dtype=np.uint8), alpha]), "RGBA")
    result = client.images.edit(
        image=("in.png", png_bytes(picture())),
        mask=("mask.png", png_bytes(rgba)),
        prompt="a cat",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 2},
    )
    edited = [decoded(item.b64_json) for item in result.data]
    assert [image.size for image in edited] == [(32, 32), (32, 32)]
    white = Image.fromarray(255 - alpha)
    status, answer = call(
        inpainting.url + "/v1/diffusion/generate",
        {
            "requests": [
                item(
                    prompt="a cat",
                    seed=5,
                    num_images_per_prompt=2,
                    image={
                        "format": "png",
                        "data": base64.b64encode(png_bytes(picture())).decode(),
                    },
                    mask_image={
                        "format": "png",
                        "data": base64.b64encode(png_bytes(white)).decode(),
                    },
                )
            ]
        },
    )
    assert status == 200, answer
    native_images = [decoded(image["data"]) for image in answer["images"][0]]
    assert [np.asarray(a).tolist() for a in edited] == [
        np.asarray(b).tolist() for b in native_images
    ]


def test_several_images_are_several_edits_each_of_its_own_size(img2img):
    client = openai.OpenAI(base_url=img2img.url + "/v1", api_key=KEY)
    result = client.images.edit(
        image=[("a.png", png_bytes(picture(32, 32))), ("b.png", png_bytes(picture(48, 24, 1)))],
        prompt="a painting",
        extra_body={"strength": 0.5, "num_inference_steps": 4},
    )
    assert [decoded(item.b64_json).size for item in result.data] == [(32, 32), (48, 24)]


def test_an_inpainting_edit_without_a_mask_takes_the_images_transparency(inpainting):
    client = openai.OpenAI(base_url=inpainting.url + "/v1", api_key=KEY)
    transparent = picture().convert("RGBA")
    transparent.putalpha(
        Image.fromarray(
            np.where(np.arange(32)[None, :] < 16, 0, 255).repeat(32, 0).astype(np.uint8)
        )
    )
    result = client.images.edit(
        image=("t.png", png_bytes(transparent)),
        prompt="a cat",
        extra_body={"num_inference_steps": 2},
    )
    assert decoded(result.data[0].b64_json).size == (32, 32)
    with pytest.raises(openai.BadRequestError, match="inpaints: send a mask"):  # no alpha, no mask
        client.images.edit(image=("in.png", png_bytes(picture())), prompt="a cat")


def test_a_text_to_image_server_answers_an_edit_with_what_to_load(text_to_image):
    client = openai.OpenAI(base_url=text_to_image.url + "/v1", api_key=KEY)
    with pytest.raises(
        openai.BadRequestError,
        match="takes no image: load an image-to-image or inpainting pipeline",
    ):
        client.images.edit(image=("in.png", png_bytes(picture())), prompt="a cat")


@pytest.mark.parametrize(
    "body, headers, message",
    [
        (b'{"prompt": "x"}', {"Content-Type": "application/json"}, "image is required"),
        (
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            "image is required",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            b"not a picture\r\n--b\r\n"
            b'Content-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            "is not an image Pillow can read",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            b"x\r\n--b\r\n"
            b'Content-Disposition: form-data; name="steps"\r\n\r\n3\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            "prompt: Field required",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            b"x\r\n--b\r\n"
            b'Content-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b\r\n'
            b'Content-Disposition: form-data; name="strength"\r\n\r\n2\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            "strength: Input should be less than or equal to 1",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            b"x\r\n--b",
            {"Content-Type": "multipart/form-data; boundary=b"},
            "image is required",
        ),
    ],
    ids=["json", "no-image", "not-an-image", "no-prompt", "strength-above-1", "truncated"],
)
def test_bad_edit_forms_are_400s(img2img, body, headers, message):

    request = urllib.request.Request(
        img2img.url + "/v1/images/edits",
        data=body,
        headers={**headers, "Authorization": f"Bearer {KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    answer = json.loads(caught.value.read())
    assert caught.value.code == 400 and message in answer["error"]["message"], answer
