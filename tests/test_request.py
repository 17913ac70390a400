"""OmniDiffusionRequest: validation names the field; dict round trips are JSON-safe."""

from __future__ import annotations

import json

import pytest

from spmd_diffusion.request import OmniDiffusionRequest


def test_prompt_alone_is_valid_and_gets_an_id():
    first, second = OmniDiffusionRequest(prompt="test"), OmniDiffusionRequest(prompt="test")
    assert first.prompt == "test" and first.seed is None and first.num_images_per_prompt == 1
    assert first.request_id and first.request_id != second.request_id


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "negative_prompt": 1}, "negative_prompt"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "x", "height": 60}, "height"),
        ({"prompt": "x", "width": 0}, "width"),
        ({"prompt": "x", "width": 64.0}, "width"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "seed": "7"}, "seed"),
        ({"prompt": "x", "num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"prompt": "x", "request_id": ""}, "request_id"),
        ({"prompt": "x", "extra": []}, "extra"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OmniDiffusionRequest(**kwargs)


def test_round_trip_through_json():
    request = OmniDiffusionRequest(
        prompt="a cat",
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=5,
        height=64,
        width=128,
        seed=7,
        num_images_per_prompt=2,
        request_id="r1",
        extra={"output_type": "np"},
    )
    data = json.loads(json.dumps(request.to_dict()))
    assert OmniDiffusionRequest.from_dict(data) == request
    assert request.guidance_scale == 5.0


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="unknown request field.*steps"):
        OmniDiffusionRequest.from_dict({"prompt": "x", "steps": 4})
    with pytest.raises(ValueError, match="'prompt' is required"):
        OmniDiffusionRequest.from_dict({"seed": 1})
    with pytest.raises(ValueError, match="JSON object"):
        OmniDiffusionRequest.from_dict(["x"])


def test_image_seeds_follow_the_request_seed():
    request = OmniDiffusionRequest(prompt="x", seed=10, num_images_per_prompt=3)
    assert request.image_seeds() == [10, 11, 12]
    with pytest.raises(ValueError, match="no seed"):
        OmniDiffusionRequest(prompt="x").image_seeds()
