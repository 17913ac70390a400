"""--quantize: diffusers' quantization configs at load time, refusals before loading, the
memory report, and the same pixels under any launcher."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from launch import BIN, generate_here

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.models.quantization import probe, resolve_components
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

pytest.importorskip("torchao", reason="the quant extra installs torchao")
pytestmark = pytest.mark.slow


def test_kinds_and_shapes_are_checked_on_construction():
    with pytest.raises(ValueError, match="quantize must be one of int8wo, int8dq, int4wo"):
        OmniDiffusionConfig(quantize="int3")
    with pytest.raises(ValueError, match="quantize with tensor parallelism"):
        OmniDiffusionConfig(quantize="int8wo", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="quantize_components must be a non-empty list"):
        OmniDiffusionConfig(quantize="int8wo", quantize_components=[])
    assert OmniDiffusionConfig(
        quantize="int8wo", quantize_components="transformer"
    ).quantize_components == ["transformer"]


def test_the_probe_refuses_what_this_machine_cannot_run():

    probe("int8wo", "cpu")  # runs here
    with pytest.raises(ValueError, match="quantize float8dq cannot run on cpu here: .*capability"):
        probe("float8dq", "cpu")
    with pytest.raises(ValueError, match="quantize bnb-nf4 needs a GPU"):
        probe("bnb-nf4", "cpu")


def test_denoiser_stands_for_the_transformer_or_the_unet():

    assert resolve_components(
        ["denoiser", "text_encoder"], ["text_encoder", "transformer", "vae"]
    ) == ["transformer", "text_encoder"]
    assert resolve_components(["denoiser"], ["unet", "vae"]) == ["unet"]
    with pytest.raises(ValueError, match="'vae_x' is not a component of this pipeline"):
        resolve_components(["vae_x"], ["unet", "vae"])


def psnr(first: np.ndarray, second: np.ndarray) -> float:
    error = np.mean((first.astype(np.float64) - second.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(255.0**2 / error)


@pytest.mark.parametrize(
    "model, bound", [("tiny-unet", 0.9), ("tiny-dit", 0.5), ("tiny-flux", 0.5)]
)
def test_int8_weights_take_a_fraction_of_the_memory_and_change_little(model, bound, capsys):
    """torchao quantizes Linear weights: a DiT's are most of its weights; the tiny UNet's
    convolutions (not quantized) are most of its own."""

    request = [
        OmniDiffusionRequest(prompt="a red cube", seed=3, num_inference_steps=3, request_id="q")
    ]
    plain = DiffusionWorker(OmniDiffusionConfig(model=model, dtype="float32"))
    quantized = DiffusionWorker(
        OmniDiffusionConfig(model=model, dtype="float32", quantize="int8wo")
    )
    full, small = (
        plain.memory_report()["denoiser_weight_bytes"],
        quantized.memory_report()["denoiser_weight_bytes"],
    )
    assert small < bound * full, (small, full)
    first = np.asarray(plain.generate(request).images[0][0])
    second = np.asarray(quantized.generate(request).images[0][0])
    value = psnr(first, second)
    with capsys.disabled():
        print(
            f"\n{model} int8wo: weights {small / full:.2f}x of fp32, "
            f"PSNR {value:.1f} dB vs unquantized"
        )
    assert 20 < value < float("inf")  # changed, and only a little
    stats = quantized.get_cache_stats()["memory"]
    assert stats["levers"] == {"quantize": "int8wo"} and stats["quantized_components"] in (
        ["unet"],
        ["transformer"],
    )
    assert quantized.model_facts(request[0])["quantize"] == "int8wo"


def test_quantized_weights_with_a_step_cache(tiny_dit):

    request = [OmniDiffusionRequest(prompt="a wave", seed=1, num_inference_steps=6, request_id="c")]
    worker = DiffusionWorker(
        OmniDiffusionConfig(model="tiny-dit", dtype="float32", quantize="int8dq", cache="pab")
    )
    first, second = worker.generate(request), worker.generate(request)
    assert first.ok and np.array_equal(
        np.asarray(first.images[0][0]), np.asarray(second.images[0][0])
    )


@pytest.mark.launcher
def test_quantized_job_under_mpiexec_gives_the_no_launcher_pixels_and_reports_memory(tmp_path):

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(4)))
    args = [
        "--prompts",
        str(prompts),
        "--model",
        "tiny-dit",
        "--steps",
        "3",
        "--batch-size",
        "1",
        "--quantize",
        "int8wo",
    ]
    assert generate_here(*args, "--output", str(tmp_path / "one")) == 0
    done = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "omni-diffuse"),
            "generate",
            *args,
            "--output",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for image in (tmp_path / "one" / "images").glob("*.png"):
        assert image.read_bytes() == (tmp_path / "two" / "images" / image.name).read_bytes()
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [rank["rank"] for rank in run["memory"]] == [0, 1]
    assert all(
        rank["levers"] == {"quantize": "int8wo"}
        and rank["denoiser_weight_bytes"] > 0
        and rank["peak_rss_bytes"] > 0
        for rank in run["memory"]
    )
    assert "memory rank 1" in done.stderr and "quantize=int8wo" in done.stderr
    line = json.loads((tmp_path / "two" / "manifest.jsonl").read_text().splitlines()[0])
    assert line["quantize"] == "int8wo"


def test_quantized_and_compiled_gives_the_eager_quantized_images(tiny_dit):

    request = [OmniDiffusionRequest(prompt="a cat", seed=1, num_inference_steps=3, request_id="c")]
    config = {"model": "tiny-dit", "dtype": "float32", "quantize": "int8wo"}
    compiled = DiffusionWorker(OmniDiffusionConfig(**config, compile=True)).generate(request)
    eager = DiffusionWorker(OmniDiffusionConfig(**config)).generate(request)
    assert compiled.ok and np.array_equal(
        np.asarray(compiled.images[0][0]), np.asarray(eager.images[0][0])
    )
