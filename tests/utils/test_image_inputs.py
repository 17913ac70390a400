"""Input images (image-to-image, inpainting): request validation, and the worker on the tiny
UNet loaded as StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from helpers import max_pixel_difference
from PIL import Image
from serving import KEY, call

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.server import serve
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.images import decode_image, encode_image
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(
        (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)
    )


def half_mask(width: int, height: int) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    noise_image(64, 64, 0).save(root / "a.png")
    noise_image(48, 40, 1).save(root / "small.png")
    half_mask(64, 64).save(root / "mask.png")
    (root / "notes.png").write_text("not an image")
    return root


# -- the request ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image": "https://example.com/cat.png"}, "is a URL: jobs run offline"),
        ({"image": "s3://bucket/cat.png"}, "is a URL"),
        ({"mask_image": "mask.png"}, "mask_image needs an image"),
        ({"image": "a.png", "strength": 0}, r"strength must be a number in \(0, 1\]"),
        ({"image": "a.png", "strength": 1.5}, r"strength must be a number in \(0, 1\]"),
        ({"image": "a.png", "strength": True}, "strength must be a number"),
        ({"image": 5}, "image must be a file path"),
        ({"image": ""}, "image must be a file path, not an empty string"),
        ({"image": {"format": "png", "data": "%%%"}}, "image: data is not valid base64"),
        ({"image": {"data": "AAAA"}}, "image as an object must be"),
        ({"extra": {"image": "a.png"}}, "extra may not set image"),
    ],
)
def test_bad_image_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionRequest(prompt="x", **kwargs)


def test_a_pil_image_or_data_uri_becomes_base64_png_and_round_trips():
    image = noise_image(16, 8, 3)
    request = OmniDiffusionRequest(prompt="x", image=image, mask_image=half_mask(16, 8), strength=1)
    assert request.image["format"] == "png" and request.strength == 1.0
    again = OmniDiffusionRequest.from_dict(json.loads(json.dumps(request.to_dict())))
    assert again == request
    decoded = Image.open(io.BytesIO(base64.b64decode(again.image["data"])))
    assert np.array_equal(np.asarray(decoded), np.asarray(image))
    uri = "data:image/png;base64," + request.image["data"]
    assert OmniDiffusionRequest(prompt="x", image=uri).image == request.image


def test_image_items_batch_apart_from_text_items_and_by_strength():
    text = OmniDiffusionRequest(prompt="x")
    first = OmniDiffusionRequest(prompt="x", image="a.png")
    other = OmniDiffusionRequest(prompt="y", image="b.png")
    assert first.batch_key() == other.batch_key() != text.batch_key()
    assert (
        OmniDiffusionRequest(prompt="x", image="a.png", strength=0.5).batch_key()
        != first.batch_key()
    )
    assert (
        OmniDiffusionRequest(prompt="x", image="a.png", mask_image="m.png").batch_key()
        != first.batch_key()
    )


def test_limits_check_the_files_before_any_work(pictures):
    config = OmniDiffusionConfig(max_image_size=56)
    config.check_limits(OmniDiffusionRequest(prompt="x", image=str(pictures / "small.png")))
    for name, message in (
        ("a.png", "image is 64x64, above the limit of 56"),
        ("none.png", "does not exist"),
        ("notes.png", "is not an image Pillow can read"),
    ):
        with pytest.raises(ValueError, match=message):
            config.check_limits(OmniDiffusionRequest(prompt="x", image=str(pictures / name)))


# -- the worker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def img2img_worker(tiny_unet):

    worker = DiffusionWorker(
        OmniDiffusionConfig(model="tiny-unet", model_class_name="StableDiffusionImg2ImgPipeline")
    )
    yield worker
    worker.shutdown()


def request(request_id: str, seed: int, **kwargs) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(
        prompt=f"a picture {request_id}",
        seed=seed,
        request_id=request_id,
        num_inference_steps=2,
        **kwargs,
    )


@pytest.mark.slow
def test_img2img_output_takes_the_input_size_and_the_strength(img2img_worker, pictures):
    output = img2img_worker.generate(
        [
            request("big", 1, image=str(pictures / "a.png")),
            request("small", 2, image=str(pictures / "small.png"), strength=0.5),
            request("resized", 3, image=str(pictures / "a.png"), height=32, width=48),
        ]
    )
    assert output.ok, output.errors
    assert [images[0].size for images in output.images] == [(64, 64), (48, 40), (48, 32)]
    assert output.metadata[0]["strength"] == 0.8  # the pipeline's default, reported
    assert output.metadata[1]["strength"] == 0.5 and output.metadata[2]["height"] == 32


@pytest.mark.slow
def test_an_image_does_not_depend_on_its_batch_mates(img2img_worker, pictures):
    """Inputs of another size never share its pipeline call (diffusers would resize them all
    to the first one's size), and the input image really drives the output."""
    alone = img2img_worker.generate([request("s", 2, image=str(pictures / "small.png"))])
    mixed = img2img_worker.generate(
        [
            request("b", 1, image=str(pictures / "a.png")),
            request("s", 2, image=str(pictures / "small.png")),
        ]
    )
    assert mixed.ok and np.array_equal(
        np.asarray(alone.images[0][0]), np.asarray(mixed.images[1][0])
    )
    other = img2img_worker.generate([request("s", 2, image=noise_image(48, 40, 9))])
    assert max_pixel_difference(alone.images[0][0], other.images[0][0]) > 0.05


@pytest.mark.slow
def test_a_pipeline_that_takes_no_image_says_so(tiny_unet, pictures):

    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-unet"))
    try:
        output = worker.generate([request("x", 1, image=str(pictures / "a.png")), request("t", 2)])
    finally:
        worker.shutdown()
    assert "StableDiffusionPipeline does not accept image" in output.errors[0]
    assert output.errors[1] is None  # the text-to-image item is unharmed


@pytest.mark.slow
def test_inpainting_takes_image_and_mask(tiny_unet, pictures):

    worker = DiffusionWorker(
        OmniDiffusionConfig(model="tiny-unet", model_class_name="StableDiffusionInpaintPipeline")
    )
    try:
        output = worker.generate(
            [
                request(
                    "m", 1, image=str(pictures / "a.png"), mask_image=str(pictures / "mask.png")
                ),
                request(
                    "n",
                    1,
                    image=str(pictures / "a.png"),
                    mask_image=half_mask(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                ),
            ]
        )
    finally:
        worker.shutdown()
    assert output.ok, output.errors
    assert output.images[0][0].size == (64, 64)
    # The 4-channel UNet inpaints by blending latents: the two masks give different images.
    assert max_pixel_difference(output.images[0][0], output.images[1][0]) > 0.05


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_native_http_route_takes_base64_images_and_refuses_paths(tiny_unet, pictures):
    pytest.importorskip("fastapi", reason="the serve extra installs fastapi")

    engine = AsyncDiffusionEngine(
        OmniDiffusionConfig(executor_class="uni", model_class_name="StableDiffusionImg2ImgPipeline")
    )
    http = serve(engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny-unet").start()
    url = http.url + "/v1/diffusion/generate"
    try:
        sent = noise_image(48, 40, 5)
        body = {
            "requests": [
                {
                    "prompt": "x",
                    "request_id": "a",
                    "seed": 1,
                    "num_inference_steps": 2,
                    "strength": 0.6,
                    "image": encode_image(sent),
                }
            ]
        }
        status, answer = call(url, body)
        assert status == 200, answer
        (image,) = answer["images"][0]
        assert decode_image(image).size == (48, 40) and answer["metadata"][0]["strength"] == 0.6
        for value, message in (
            (str(pictures / "a.png"), "the server reads no files"),
            ("http://example.com/a.png", "is a URL"),
            (
                {"format": "png", "data": base64.b64encode(b"plain text").decode()},
                "image data is not an image Pillow can read",
            ),
        ):
            body["requests"][0]["image"] = value
            status, answer = call(url, body)
            assert status == 400 and message in answer["error"]["message"], answer
        body["requests"][0].update(image=encode_image(sent), lora=["org/some-lora"])
        status, answer = call(url, body)
        # a client names adapters the server offers (--lora NAME=PATH), never a hub id or path
        assert status == 400 and "unknown LoRA 'org/some-lora'" in answer["error"]["message"], (
            answer
        )
    finally:
        http.shutdown()
        http.server_close()
