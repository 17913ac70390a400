"""Sequence parallel (Ulysses, ring, USP) on every transformer family, alone and composed with
tensor, CFG and data parallel, and CFG parallel on every guided family (doubled batches and
one call per branch), against each family's single-rank images (shared by the torchrun and
MPI modules, which import everything from here).

One launch runs every family under every layout its world size allows: 2 ranks give
ulysses=2 and ring=2; 4 ranks add ulysses=2 x ring=2, sp=2 x tp=2, sp=2 x cfg=2 and
sp=2 x dp=2. Each rank computes the references itself before any layout is applied;
verdicts are gathered over all ranks before any assert (see parallel_checks).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from parallel_checks import (
    max_difference,
    verdict_on_all_ranks,
)  # the world fixture comes with parallel_checks

from spmd_diffusion.models import ensure_tiny_model, load_pipeline
from spmd_diffusion.models.quantization import pipeline_config
from spmd_diffusion.models.tiny import CALL_DEFAULTS
from spmd_diffusion.parallel import ParallelLayout, build_device_mesh, parallelize_pipeline
from spmd_diffusion.parallel.sequence_parallel import refusal

SP_FAMILIES = (
    "tiny-dit",
    "tiny-sd3",
    "tiny-flux",
    "tiny-qwen-image",
    "tiny-sana",
    "tiny-video",
    "tiny-ltx",
)
ALL_FAMILIES = ("tiny-unet", "tiny-sdxl", *SP_FAMILIES)
# Families whose guidance doubles the batch (CFG parallel splits it) or calls the denoiser per
# branch (Qwen-Image with a negative prompt, Wan): every one but guidance-distilled Flux.
GUIDED_FAMILIES = tuple(family for family in ALL_FAMILIES if family != "tiny-flux")
BRANCH_FAMILIES = ("tiny-qwen-image", "tiny-video")  # one denoiser call per guidance branch
SP_TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels
SP_STEPS = 3
# ParallelLayout arguments; a world larger than the replica makes the rest data parallel
# (4 ranks: ulysses2 and ring2 run as 2 replicas of 2).
LAYOUTS = {
    "ulysses2": {"ulysses": 2},
    "ring2": {"ring": 2},
    "ulysses2-ring2": {"ulysses": 2, "ring": 2},
    "ulysses2-tp2": {"ulysses": 2, "tp": 2},
    "ring2-cfg2": {"ring": 2, "cfg": 2},
}


def load_family(family: str) -> Any:

    return load_pipeline(str(ensure_tiny_model(family)), None, torch.float32)


def sp_generate(pipeline: Any, family: str) -> np.ndarray:
    """Two prompts (different lengths: masked text in Qwen-Image), fixed seeds, guided where
    the family guides, 64x64 (9 frames for videos), float pixels in [0, 1]."""
    params = inspect.signature(pipeline.__call__).parameters
    kwargs: dict[str, Any] = {
        **CALL_DEFAULTS.get(family.removeprefix("tiny-"), {}),
        "height": 64,
        "width": 64,
    }
    kwargs.update(
        {name: False for name in ("use_resolution_binning", "clean_caption") if name in params}
    )
    if family in GUIDED_FAMILIES:
        kwargs["negative_prompt"] = ["blurry", "a dull grey picture"]
        kwargs["guidance_scale"] = 4.5
        if "true_cfg_scale" in params:
            kwargs["true_cfg_scale"] = 4.0
    with torch.inference_mode():
        result = pipeline(
            prompt=["a red cube on a table", "a blue sphere over the sea"],
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in (21, 22)],
            num_inference_steps=SP_STEPS,
            output_type="np",
            **kwargs,
        )
    images = result.frames if hasattr(result, "frames") else result.images
    return np.asarray(images, dtype=np.float64)


@pytest.fixture(scope="module")
def sp_references(world) -> dict[str, np.ndarray]:
    return {family: sp_generate(load_family(family), family) for family in ALL_FAMILIES}


@pytest.fixture(scope="module")
def sp_meshes(world) -> dict[str, Any]:
    """Every layout this world size allows, its mesh built once (a collective)."""

    meshes = {}
    for name, kwargs in LAYOUTS.items():
        try:
            layout = ParallelLayout(world[1], **kwargs)
        except ValueError:  # needs more ranks than this launch has
            continue
        meshes[name] = (layout, build_device_mesh(layout, "cpu"))
    return meshes


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("family", SP_FAMILIES)
def test_sequence_parallel_matches_single_rank(family, layout_name, sp_references, sp_meshes):

    if layout_name not in sp_meshes:
        pytest.skip(f"{layout_name} needs more ranks (torchrun --nproc-per-node 4)")
    layout, mesh = sp_meshes[layout_name]
    if layout.cfg == 2 and family not in GUIDED_FAMILIES:
        pytest.skip(f"{family} has no classifier-free guidance")

    def body():
        pipeline = load_family(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(sp_generate(pipeline, family), sp_references[family])
        calls = report.sp.counter.calls
        ok = difference <= SP_TOLERANCE and calls > 0 and report.sp.attention_modules > 0
        return (
            ok,
            f"max difference {difference:.2e}; {calls} sequence-parallel attention calls; "
            f"{report.summary()}",
        )

    verdict_on_all_ranks(body)


def test_a_unet_is_refused_naming_the_reason(world):

    assert "UNet" in refusal("UNet2DConditionModel", {}, 2, 1)
    assert "4 heads" in refusal("FluxTransformer2DModel", {"num_attention_heads": 4}, 3, 1)
    assert (
        refusal("SanaTransformer2DModel", {"num_attention_heads": 3}, 2, 1) is None
    )  # linear attention
    assert "no sequence-parallel plan" in refusal("HunyuanDiT2DModel", {}, 1, 2)


@pytest.fixture(scope="module")
def cfg_pair_mesh(world):

    layout = ParallelLayout(world[1], cfg=2)
    return layout, build_device_mesh(layout, "cpu")


@pytest.fixture(scope="module")
def tp_pair_mesh(world):

    layout = ParallelLayout(world[1], tp=2)
    return layout, build_device_mesh(layout, "cpu")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_tensor_parallel_shards_every_block_of_every_family(family, sp_references, tp_pair_mesh):
    """Every attention (joint, single-stream, qk-norm across heads), feed-forward (GEGLU,
    GLUMBConv) and adaLN modulation sharded; nothing left replicated among them."""

    layout, mesh = tp_pair_mesh

    def body():
        pipeline = load_family(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(sp_generate(pipeline, family), sp_references[family])
        unet = family in ("tiny-unet", "tiny-sdxl")
        ok = (
            difference <= SP_TOLERANCE
            and not report.tp.skipped
            and report.tp.attention
            and report.tp.feedforward
            and report.tp.param_ratio < (0.95 if unet else 0.7)
        )
        return ok, f"max difference {difference:.2e}; {report.tp.summary()}"

    verdict_on_all_ranks(body)


@pytest.mark.parametrize("family", GUIDED_FAMILIES)
def test_cfg_parallel_splits_every_guided_family(family, sp_references, cfg_pair_mesh):
    """Doubled batches are halved on every step; branch calls run whole on the first step
    (the pairing is learned there) and paired on every other: 2 x (steps - 1) split calls."""

    layout, mesh = cfg_pair_mesh

    def body():
        pipeline = load_family(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(sp_generate(pipeline, family), sp_references[family])
        calls = (report.cfg.split_calls, report.cfg.whole_calls)
        expected = (2 * (SP_STEPS - 1), 2) if family in BRANCH_FAMILIES else (SP_STEPS, 0)
        return (
            difference <= SP_TOLERANCE and calls == expected,
            f"max difference {difference:.2e}; (split, whole) calls {calls}, expected {expected}",
        )

    verdict_on_all_ranks(body)


@pytest.fixture(scope="module")
def tp_cfg_pair_mesh(world):

    if world[1] % 4:
        pytest.skip("tp=2 with cfg=2 needs a multiple of 4 ranks (torchrun --nproc-per-node 4)")
    layout = ParallelLayout(world[1], tp=2, cfg=2)
    return layout, build_device_mesh(layout, "cpu")


@pytest.mark.parametrize("family", GUIDED_FAMILIES)
def test_tp2_with_cfg2_on_every_guided_family(family, sp_references, tp_cfg_pair_mesh):

    layout, mesh = tp_cfg_pair_mesh

    def body():
        pipeline = load_family(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(sp_generate(pipeline, family), sp_references[family])
        ok = difference <= SP_TOLERANCE and report.cfg.split_calls > 0 and not report.tp.skipped
        return (
            ok,
            f"max difference {difference:.2e}; "
            f"cfg calls {report.cfg.split_calls}/{report.cfg.whole_calls}",
        )

    verdict_on_all_ranks(body)


# The KL autoencoder's families, and the causal 3-D VAE's (Wan, Qwen-Image)
VAE_FAMILIES = (
    "tiny-unet",
    "tiny-sdxl",
    "tiny-dit",
    "tiny-sd3",
    "tiny-flux",
    "tiny-video",
    "tiny-qwen-image",
)


@pytest.mark.parametrize("family", VAE_FAMILIES)
def test_vae_parallel_decode_matches_single_rank(family, sp_references, tp_pair_mesh):
    """Each rank decodes a band of rows (halo rows, synced group norms, gathered attention):
    the pixels are the whole decode's."""

    layout, mesh = tp_pair_mesh

    def body():
        pipeline = load_family(family)
        report = parallelize_pipeline(pipeline, layout, mesh, vae_parallel=True)
        difference = max_difference(sp_generate(pipeline, family), sp_references[family])
        vae = report.vae.describe()
        calls = (
            3 if family == "tiny-video" else 1
        )  # a video decodes one latent frame per call (9 frames: 3)
        ok = (
            difference <= SP_TOLERANCE
            and vae["split_decoder_calls"] == calls
            and vae["whole_decoder_calls"] == 0
            and vae["halo_convs"] > 0
        )
        return ok, f"max difference {difference:.2e}; {vae}"

    verdict_on_all_ranks(body)


@pytest.mark.parametrize("family", [family for family in VAE_FAMILIES if family in GUIDED_FAMILIES])
def test_vae_parallel_over_a_four_rank_replica(family, sp_references, tp_cfg_pair_mesh):
    """tp 2 x cfg 2: the decode in four bands of two latent rows (runs with 4 ranks only)."""

    layout, mesh = tp_cfg_pair_mesh

    def body():
        pipeline = load_family(family)
        report = parallelize_pipeline(pipeline, layout, mesh, vae_parallel=True)
        difference = max_difference(sp_generate(pipeline, family), sp_references[family])
        vae = report.vae.describe()
        return difference <= SP_TOLERANCE and vae["ranks"] == 4 and vae[
            "whole_decoder_calls"
        ] == 0, f"max difference {difference:.2e}; {vae}"

    verdict_on_all_ranks(body)


def load_quantized(family: str) -> Any:

    return load_pipeline(
        str(ensure_tiny_model(family)),
        None,
        torch.float32,
        quantization_config=pipeline_config("int8wo", ["transformer"]),
    )


@pytest.mark.parametrize("layout_name", ["ulysses2", "ring2-cfg2", "cfg2"])
def test_quantized_weights_compose_with_sequence_and_cfg_parallel(layout_name, world):
    """Every rank quantizes its own copy as it loads: a layout of Qwen-Image with int8
    weights gives the single rank's int8 images."""
    pytest.importorskip("torchao")

    kwargs = {"cfg2": {"cfg": 2}, **LAYOUTS}[layout_name]
    try:
        layout = ParallelLayout(world[1], **kwargs)
    except ValueError:
        pytest.skip(f"{layout_name} needs more ranks")
    mesh = build_device_mesh(layout, "cpu")

    def body():
        reference = sp_generate(load_quantized("tiny-qwen-image"), "tiny-qwen-image")
        pipeline = load_quantized("tiny-qwen-image")
        parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(sp_generate(pipeline, "tiny-qwen-image"), reference)
        return difference <= SP_TOLERANCE, f"max difference {difference:.2e}"

    verdict_on_all_ranks(body)
