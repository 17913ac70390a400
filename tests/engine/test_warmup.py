"""--warmup: one pipeline call per replica before the timed work, its images dropped.

On by default where the device is a GPU, so on this CPU machine only ``--warmup`` (or
``warmup=True``) runs it; the pixels of the job are the same either way."""

from __future__ import annotations

import json

import pytest
from launch import generate_here

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig
from spmd_diffusion.models.tiny.families import BUILDERS
from spmd_diffusion.request import OmniDiffusionRequest

pytestmark = pytest.mark.slow


CALLS: list[int] = []  # module-level: a call sent to a worker is pickled by reference


def count_denoiser_calls(worker) -> None:
    worker.denoiser.register_forward_pre_hook(lambda module, args: CALLS.append(1))


def timing(output) -> dict:
    return json.loads((output / "run.json").read_text())["timing"]


def test_a_warmed_up_job_reports_its_warm_up_apart_and_makes_the_same_images(tmp_path, tiny_unet):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\na green tree\n")
    common = ["--prompts", str(prompts), "--steps", "3", "--height", "32", "--width", "32"]
    assert generate_here(*common, "--output", str(tmp_path / "warm"), "--warmup") == 0
    assert generate_here(*common, "--output", str(tmp_path / "cold")) == 0
    warm, cold = timing(tmp_path / "warm"), timing(tmp_path / "cold")
    assert warm["warmup_s"] > 0
    assert "warmup_s" not in cold  # CPU: off unless asked
    config = json.loads((tmp_path / "warm" / "run.json").read_text())["config"]
    assert config["warmup"] is True
    for name in ("000001.png", "000002.png", "000003.png"):
        warm_png = (tmp_path / "warm" / "images" / name).read_bytes()
        assert warm_png == (tmp_path / "cold" / "images" / name).read_bytes()
    records = (tmp_path / "warm" / "manifest.jsonl").read_text()
    assert "warm-up" not in records  # the warm-up's own requests leave no record


@pytest.mark.parametrize(("warmup", "runs"), [(True, True), (None, False), (False, False)])
def test_the_engine_warms_every_rank_up_only_where_asked(tiny_unet, warmup, runs):
    """The uni executor's worker runs in this process: its denoiser's calls are counted here.
    A warm-up runs at most 2 steps whatever the request asks, and counts no images."""
    CALLS.clear()
    config = OmniDiffusionConfig(executor_class="uni", warmup=warmup)
    with DiffusionEngine(config) as engine:
        engine.collective_rpc(count_denoiser_calls)
        seconds = engine.warm_up([OmniDiffusionRequest("warm-up", num_inference_steps=50)])
        stats = engine.collective_rpc("get_cache_stats")[0]
    assert (seconds is not None and seconds > 0) is runs
    assert len(CALLS) == (2 if runs else 0)  # SD 1.x: one call per step, both branches in it
    assert stats["images_generated"] == 0


@pytest.mark.parametrize(
    "model", [f"tiny-{family}" for family in sorted(BUILDERS) if family != "unet"]
)
def test_every_family_warms_up(model):
    """The warm-up is the family's own pipeline call, at 2 steps (SD 1.x: above)."""
    config = OmniDiffusionConfig(model=model, executor_class="uni", warmup=True)
    with DiffusionEngine(config) as engine:
        seconds = engine.warm_up([OmniDiffusionRequest("warm-up", height=64, width=64)])
        stats = engine.collective_rpc("get_cache_stats")[0]
    assert seconds is not None and seconds > 0
    assert stats["images_generated"] == 0 and stats["requests_failed"] == 0
