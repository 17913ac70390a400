"""--cache KIND[:VALUE]: diffusers' step-cache hooks on the denoiser, each kind on the tiny DiT
(the tiny UNet takes pyramid attention broadcast only), the cache context and state reset
the tool supplies, and the cache in the manifest and the resume fingerprint.
(TP and CFG parallel with each kind: tests/multirank/parallel_checks.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.entrypoints.cli import main
from spmd_diffusion.models.loader import denoiser_config
from spmd_diffusion.models.step_cache import (
    CACHE_KINDS,
    UNET_KINDS,
    UNSUPPORTED,
    CacheSpec,
    parse_cache,
)
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

STEPS = 12
SPECS = ("first-block:0.2", "taylorseer:2", "pab", "faster")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("first-block", CacheSpec("first-block")),
        ("first-block:0.1", CacheSpec("first-block", 0.1)),
        ("TaylorSeer:3", CacheSpec("taylorseer", 3)),
        ("pab:4", CacheSpec("pab", 4)),
        ("faster", CacheSpec("faster")),
    ],
)
def test_parse(text, expected):
    assert parse_cache(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("teacache", "not one of first-block, taylorseer, pab, faster"),
        ("pab:x", "must be a number"),
        ("taylorseer:2.5", "whole number of steps"),
        ("pab:0", "whole number of steps"),
        ("first-block:0", "threshold in"),
        ("", "KIND[:VALUE]"),
    ],
)
def test_parse_refuses(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_cache(text)


def test_config_makes_the_default_value_explicit():
    """The normalised form is what the manifest and fingerprint record: 'pab' and 'pab:2' are
    the same run."""
    assert (
        OmniDiffusionConfig(cache="pab").cache
        == "pab:2"
        == OmniDiffusionConfig(cache="pab:2").cache
    )
    assert (
        OmniDiffusionConfig(cache="first-block").cache
        == f"first-block:{CACHE_KINDS['first-block']:g}"
    )
    with pytest.raises(ValueError, match="cache kind"):
        OmniDiffusionConfig(cache="magic")


def requests(count: int = 2) -> list[OmniDiffusionRequest]:
    return [
        OmniDiffusionRequest(
            prompt=f"a tiny thing {i}",
            seed=100 + i,
            num_inference_steps=STEPS,
            height=64,
            width=64,
            request_id=f"r{i}",
        )
        for i in range(count)
    ]


def pixels(output) -> np.ndarray:
    assert output.ok, output.errors
    return np.stack(
        [np.asarray(image, dtype=np.float64) / 255 for images in output.images for image in images]
    )


@pytest.fixture(scope="module")
def uncached(tiny_dit):

    return pixels(
        DiffusionWorker(OmniDiffusionConfig(model="tiny-dit", dtype="float32")).generate(requests())
    )


@pytest.mark.parametrize("spec", SPECS)
def test_each_kind_changes_little_and_is_reset_between_calls(uncached, spec):
    """A cache approximates: the image moves (so the hooks act) but stays close (PSNR), and the
    same batch twice gives the same pixels: no state from one pipeline call reaches the next."""

    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-dit", dtype="float32", cache=spec))
    first, second = pixels(worker.generate(requests())), pixels(worker.generate(requests()))
    difference = np.abs(first - uncached).max()
    psnr = 10 * np.log10(1 / np.mean((first - uncached) ** 2))
    assert 0 < difference and psnr > 30, (difference, psnr)
    assert np.array_equal(first, second)
    stats = worker.get_cache_stats()
    assert stats["cache"] == str(parse_cache(spec)) and stats["cache_hooked_modules"] > 0
    assert worker.step_cache.timestep() == 1000.0  # the probe is reset with the hooks


def test_a_failed_call_leaves_no_cache_state(tiny_dit):
    """A call that dies mid-denoising (here the scheduler raising at step 3) must not leave
    half-filled caches behind: the next call gives what a fresh worker gives."""

    config = OmniDiffusionConfig(model="tiny-dit", dtype="float32", cache="taylorseer:2")
    fresh = pixels(DiffusionWorker(config).generate(requests(1)))
    worker = DiffusionWorker(config)

    scheduler, calls = worker.pipeline.scheduler, []
    real_step = scheduler.step

    def explode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step(*args, **kwargs)

    scheduler.step = explode
    failed = worker.generate(requests(1))
    assert failed.errors[0] and "boom" in failed.errors[0]
    del scheduler.step
    assert np.array_equal(pixels(worker.generate(requests(1))), fresh)


def test_unet_takes_pab_only(tiny_unet, tmp_path, capsys):

    worker = DiffusionWorker(OmniDiffusionConfig(model="tiny-unet", dtype="float32", cache="pab"))
    assert worker.generate(requests(1)).ok and worker.step_cache.modules > 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    with pytest.raises(SystemExit) as exited:  # refused before any model loads
        main(
            [
                "generate",
                "--model",
                "tiny-unet",
                "--prompts",
                str(prompts),
                "--output",
                str(tmp_path / "out"),
                "--cache",
                "first-block",
            ]
        )
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "needs a transformer denoiser" in err and "--cache pab" in err
    assert not (tmp_path / "out").exists()


def test_cache_is_in_the_manifest_run_json_and_fingerprint(tiny_dit, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    lines = {}
    for name, extra in (("plain", []), ("cached", ["--cache", "taylorseer:2"])):
        with pytest.raises(SystemExit) as exited:
            main(
                [
                    "generate",
                    "--model",
                    "tiny-dit",
                    "--prompts",
                    str(prompts),
                    "--output",
                    str(tmp_path / name),
                    "--steps",
                    "8",
                    *extra,
                ]
            )
        assert exited.value.code == 0, capsys.readouterr().err
        lines[name] = json.loads((tmp_path / name / "manifest.jsonl").read_text().splitlines()[0])
    assert lines["cached"]["cache"] == "taylorseer:2" and "cache" not in lines["plain"]
    assert lines["cached"]["fingerprint"] != lines["plain"]["fingerprint"]
    run = json.loads((tmp_path / "cached" / "run.json").read_text())
    assert run["config"]["cache"] == "taylorseer:2"
    assert (tmp_path / "cached" / "images" / "000001.png").read_bytes() != (
        tmp_path / "plain" / "images" / "000001.png"
    ).read_bytes()


def test_every_kind_runs_on_the_video_model(tiny_video):
    """Wan's pipeline sets its own cache contexts, one per guidance branch, inside the tool's;
    FasterCache sees 5-D latents (BCFHW) and keeps the unconditional branch, which Wan runs
    in a call of its own."""

    request = [
        OmniDiffusionRequest(prompt="a wave", seed=1, num_inference_steps=STEPS, request_id="v")
    ]

    def frames(output) -> np.ndarray:
        assert output.ok, output.errors
        return np.stack(
            [np.asarray(frame, dtype=np.float64) / 255 for frame in output.images[0][0]]
        )

    plain = frames(
        DiffusionWorker(OmniDiffusionConfig(model="tiny-video", dtype="float32")).generate(request)
    )
    for spec in SPECS:
        worker = DiffusionWorker(
            OmniDiffusionConfig(model="tiny-video", dtype="float32", cache=spec)
        )
        first, second = frames(worker.generate(request)), frames(worker.generate(request))
        assert 0 < np.abs(first - plain).max() < 0.1 and np.array_equal(first, second), spec


FAMILY_MODELS = ("tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-qwen-image", "tiny-sana", "tiny-ltx")


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_every_kind_on_every_family_runs_or_is_refused_before_loading(model, tmp_path, capsys):
    """Each cache kind either makes images through the worker (the same twice: state is
    reset) or is refused by the CLI before any model loads, naming why: never a failure
    after loading. (tiny-unet, tiny-dit and tiny-video are covered above.)"""

    denoiser = denoiser_config(model)[0]
    request = [
        OmniDiffusionRequest(
            prompt="a wave",
            negative_prompt="blur",
            seed=1,
            num_inference_steps=STEPS,
            request_id="c",
        )
    ]
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    ran = []
    for kind in ("first-block", "taylorseer", "pab", "faster"):
        refused = (denoiser, kind) in UNSUPPORTED or (
            denoiser.startswith("UNet") and kind not in UNET_KINDS
        )
        if refused:
            capsys.readouterr()  # earlier workers' logs
            with pytest.raises(SystemExit) as exited:
                main(
                    [
                        "generate",
                        "--model",
                        model,
                        "--prompts",
                        str(prompts),
                        "--output",
                        str(tmp_path / kind),
                        "--cache",
                        kind,
                    ]
                )
            err = capsys.readouterr().err
            assert (
                exited.value.code == 2
                and f"cache {kind}" in err
                and not re.search(r"loaded \w+ on", err)
            ), err
            continue
        worker = DiffusionWorker(OmniDiffusionConfig(model=model, dtype="float32", cache=kind))
        first, second = worker.generate(request), worker.generate(request)
        assert first.ok and second.ok, (kind, first.errors)
        assert np.array_equal(np.asarray(first.images[0][0]), np.asarray(second.images[0][0])), kind
        ran.append(kind)
    assert "pab" in ran  # every family takes pyramid attention broadcast
