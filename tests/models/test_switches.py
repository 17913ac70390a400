"""Memory and speed switches: --offload, --vae-tiling/--vae-slicing, --attention-backend,
--compile. Each runs here on the CPU where it can, or is refused before loading with the
reason (offload needs a GPU), and the tests say which."""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL, torch)

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess

import pytest
from helpers import max_pixel_difference
from launch import BIN

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.entrypoints.cli import main
from spmd_diffusion.models.options import compile_denoiser, compile_seconds
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

HAS_GPU = importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()


def run_cli(tmp_path, capsys, *args: str) -> tuple[int, str]:
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "out"), *args])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="on a GPU machine offload runs (see test_offload_on_a_gpu)")
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_without_a_gpu_is_refused_before_loading(tmp_path, capsys, mode):
    """diffusers itself raises "requires accelerator, but not found" -- after the model
    loaded; the tool says so up front (exit 2)."""
    code, err = run_cli(tmp_path, capsys, "--offload", mode)
    assert (
        code == 2
        and f"--offload {mode} moves models between the CPU and a GPU, and this machine has none"
        in err
    )
    assert not (tmp_path / "out").exists()


def test_offload_on_the_cpu_device_or_with_parallelism_is_refused():
    for kwargs in ({"device": "cpu"}, {"tensor_parallel_size": 2}, {"cfg_parallel": True}):
        with pytest.raises(ValueError, match="offload moves whole models"):
            OmniDiffusionConfig(offload="model", **kwargs)


@pytest.mark.skipif(
    not HAS_GPU, reason="CPU offload needs a GPU (diffusers: 'requires accelerator'); none here"
)
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_on_a_gpu(tiny_unet, mode):

    plain = DiffusionWorker(OmniDiffusionConfig(model="tiny-unet", dtype="float32"))
    offloaded = DiffusionWorker(
        OmniDiffusionConfig(model="tiny-unet", dtype="float32", offload=mode)
    )
    request = OmniDiffusionRequest(prompt="x", seed=1, num_inference_steps=2, height=32, width=32)
    first, second = plain.generate([request]), offloaded.generate([request])
    assert first.ok and second.ok
    assert max_pixel_difference(first.images[0][0], second.images[0][0]) <= 2 / 255


@pytest.mark.parametrize(
    "backend, message",
    [
        (
            "no-such-backend",
            "attention_backend 'no-such-backend' is not one of diffusers' backends",
        ),
        pytest.param(
            "flash",
            "attention_backend 'flash' cannot run here",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("flash_attn") is not None,
                reason="flash-attn is installed here",
            ),
        ),
    ],
)
def test_unusable_attention_backends_are_refused_before_loading(tmp_path, capsys, backend, message):
    code, err = run_cli(tmp_path, capsys, "--attention-backend", backend)
    assert code == 2 and message in err, err


@pytest.fixture(scope="module")
def plain_worker(tiny_unet):

    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-unet"))
    yield worker
    worker.shutdown()


def two_requests(size: int = 32) -> list[OmniDiffusionRequest]:
    return [
        OmniDiffusionRequest(
            prompt=f"a tree {i}",
            seed=i,
            request_id=f"r{i}",
            num_inference_steps=2,
            height=size,
            width=size,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_vae_tiling_and_slicing_are_switched_on_and_used(tiny_unet):

    worker = DiffusionWorker(
        OmniDiffusionConfig(model="tiny-unet", vae_tiling=True, vae_slicing=True)
    )
    try:
        vae = worker.pipeline.vae
        assert vae.use_tiling and vae.use_slicing
        calls = []
        tiled_decode = vae.tiled_decode
        vae.tiled_decode = lambda *args, **kwargs: (
            calls.append(args[0].shape) or tiled_decode(*args, **kwargs)
        )
        # 128 px is past the tiny VAE's 64 px tile: decoded in tiles, one image at a time (slicing)
        output = worker.generate(two_requests(128))
    finally:
        worker.shutdown()
    assert output.ok and output.images[0][0].size == (128, 128)
    assert [shape[0] for shape in calls] == [1, 1], "each image decoded alone (slicing), in tiles"


@pytest.mark.slow
def test_native_attention_backend_runs_and_says_what_it_drives(tiny_unet, plain_worker, caplog):
    """The tiny UNet's attention processors predate diffusers' dispatcher: the backend is set
    (diffusers' own call), drives 0 modules, and a warning says so; the pixels are unchanged."""

    with caplog.at_level(logging.WARNING, logger="spmd_diffusion.models.options"):
        worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-unet", attention_backend="native"))
    try:
        assert worker.get_cache_stats()["attention_modules"] == 0
        assert (
            "no attention module of StableDiffusionPipeline uses diffusers' dispatcher"
            in caplog.text
        )
        output = worker.generate(two_requests())
    finally:
        worker.shutdown()
    baseline = plain_worker.generate(two_requests())
    assert output.ok and max_pixel_difference(output.images[0][0], baseline.images[0][0]) == 0


def test_compile_wraps_the_denoiser_and_counts_compile_seconds():
    """The plumbing, on a two-layer stand-in denoiser (inductor compiles it in seconds)."""
    import torch

    class Pipeline:
        unet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())

    pipeline = Pipeline()
    eager = pipeline.unet
    before = compile_seconds()
    compile_denoiser(pipeline)
    assert pipeline.unet is not eager and pipeline.unet._orig_mod is eager
    x = torch.randn(2, 4)
    assert torch.allclose(pipeline.unet(x), eager(x), atol=1e-6)
    assert compile_seconds() > before


COMPILE_REASON = (
    "torch.compile of the tiny UNet takes 1-6 minutes of CPU (dynamo tracing + inductor); "
    "SPMD_DIFFUSION_TEST_COMPILE=1 runs it (scripts/bench_compile.py measures it)"
)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("SPMD_DIFFUSION_TEST_COMPILE") != "1", reason=COMPILE_REASON)
def test_compile_gives_the_same_images_and_reports_its_compile_time(tmp_path, plain_worker):
    """torch.compile of the denoiser on the CPU (inductor needs a C compiler: present here).
    The job's run.json reports compile seconds apart from the throughput."""
    output = tmp_path / "out"
    done = subprocess.run(
        [
            str(BIN / "omni-diffuse"),
            "generate",
            "--executor",
            "uni",
            "--model",
            "tiny-unet",
            "--prompt",
            "a tree 0",
            "--prompt",
            "a tree 1",
            "--seed",
            "0",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            "--batch-size",
            "1",
            "--compile",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert run["config"]["compile"] is True
    assert 0 < run["compile_seconds"] < run["seconds"]
    assert run["images_per_second_excluding_compile"] > run["images_per_second"]
    assert "compile seconds" in done.stderr and "images/s excluding compile" in done.stderr
    from PIL import Image

    manifest = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    seeds = {line["id"]: line["seed"] for line in manifest}
    for item_id, prompt in (("000001", "a tree 0"), ("000002", "a tree 1")):
        request = OmniDiffusionRequest(
            prompt=prompt, seed=seeds[item_id], num_inference_steps=2, height=32, width=32
        )
        eager = plain_worker.generate([request]).images[0][0]
        compiled = Image.open(output / "images" / f"{item_id}.png")
        assert max_pixel_difference(eager, compiled) <= 2 / 255  # inductor reorders float sums
