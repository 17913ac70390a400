"""Image-to-image and inpainting batch jobs from a JSONL of image paths: ``mpiexec -n 2``
gives the same PNG bytes as the no-launcher run, and the manifest records the inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from launch import generate, generate_here, images, manifest
from PIL import Image

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

PIPELINES = {
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
}


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    """prompts.jsonl beside pics/: two input sizes, a strength of its own, a mask per item."""
    root = tmp_path_factory.mktemp("img-prompts")
    (root / "pics").mkdir()
    for index, (width, height) in enumerate([(64, 64), (32, 48), (64, 64)]):
        pixels = np.random.RandomState(index).rand(height, width, 3) * 255
        Image.fromarray(pixels.astype(np.uint8)).save(root / "pics" / f"in{index}.png")
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[:, : width // 2 if index % 2 else width // 4] = 255
        Image.fromarray(mask).save(root / "pics" / f"mask{index}.png")
    lines = [
        {
            "prompt": f"a painting {index}",
            "image": f"pics/in{index}.png",
            "mask_image": f"pics/mask{index}.png",
        }
        for index in range(3)
    ]
    lines[2]["strength"] = 0.5
    other_mask = np.zeros((64, 64), dtype=np.uint8)
    other_mask[:, :32] = 255  # another mask of the first input's size (a mask must match its image)
    Image.fromarray(other_mask).save(root / "pics" / "mask-again.png")
    lines.append(
        {
            "prompt": "the first input again",
            "image": "pics/in0.png",
            "mask_image": "pics/mask-again.png",
            "id": "again",
        }
    )
    (root / "inpaint.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # the img2img pipeline takes no mask: the same items without one
    (root / "img2img.jsonl").write_text(
        "".join(
            json.dumps({k: v for k, v in line.items() if k != "mask_image"}) + "\n"
            for line in lines
        )
    )
    return root


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(PIPELINES))
def test_same_pixels_under_mpiexec_and_no_launcher(prompt_dir, tmp_path, kind):
    prompts = prompt_dir / f"{kind}.jsonl"
    args = [
        "--prompts",
        str(prompts),
        "--model",
        "tiny-unet",
        "--model-class-name",
        PIPELINES[kind],
        "--steps",
        "2",
        "--batch-size",
        "2",
    ]
    outputs = {launcher: tmp_path / f"out-{launcher}" for launcher in ("none", "mpiexec")}
    assert generate_here(*args, "--output", str(outputs["none"])) == 0
    done = generate("mpiexec", *args, "--output", str(outputs["mpiexec"]), timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert images(outputs["none"]) == images(outputs["mpiexec"])
    lines = {line["id"]: line for line in manifest(outputs["mpiexec"])}
    assert {line["rank"] for line in lines.values()} == {0, 1}, "both replicas did work"
    assert lines["000002"]["image"] == str(
        prompt_dir / "pics" / "in1.png"
    )  # relative to the prompt file
    assert lines["000002"].get("mask_image") == (
        str(prompt_dir / "pics" / "mask1.png") if kind == "inpaint" else None
    )
    default_strength = {"img2img": 0.8, "inpaint": 1.0}[
        kind
    ]  # each pipeline's own default, reported
    assert lines["000003"]["strength"] == 0.5 and lines["000001"]["strength"] == default_strength
    sizes = {
        name: Image.open(outputs["none"] / "images" / name).size for name in images(outputs["none"])
    }
    # the output keeps each input's size (the inpainting pipeline would make the model's 64x64)
    assert sizes["000002.png"] == (32, 48)
    # the same input with another mask (inpaint) or another seed (img2img) gives another image
    assert images(outputs["none"])["again.png"] != images(outputs["none"])["000001.png"]
