"""Tensor-parallel and CFG-parallel correctness on real ranks (shared by the torchrun and MPI
modules, which import everything from here).

Every rank computes the single-rank reference image itself before anything is
parallelized, then runs the parallel pipeline and compares. Verdicts are gathered over all
ranks before any assert, so every rank passes or fails the same test together and no rank
is left waiting in a collective that another skipped. Gloo collectives time out after 60 s
and every test has a hard (thread) timeout, so a hang ends the job instead of blocking it.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch); optional extras load
# only where used (mpi4py)

from __future__ import annotations

import datetime
import gc
import inspect
import os
import socket
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from spmd_diffusion.distributed.launcher import MPI, TORCHRUN, detect_launcher
from spmd_diffusion.models import ensure_tiny_model, load_pipeline
from spmd_diffusion.models.step_cache import enable_step_cache
from spmd_diffusion.parallel import (
    ParallelLayout,
    apply_tensor_parallel,
    build_device_mesh,
    denoiser_of,
    disable_cfg_parallel,
    parallelize_pipeline,
)

FAMILIES = ("tiny-unet", "tiny-dit")
# Every family the multi-rank checks load (sequence_checks too): built before the group forms.
BUILT_FAMILIES = (
    "tiny-unet",
    "tiny-sdxl",
    "tiny-dit",
    "tiny-sd3",
    "tiny-flux",
    "tiny-qwen-image",
    "tiny-sana",
    "tiny-video",
    "tiny-ltx",
)
PROMPTS = ["a red cube on a table", "a blue sphere"]
SEEDS = [11, 12]
GUIDED, UNGUIDED = 4.5, 1.0
STEPS = 4
TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# Per test, fixtures included; "thread" ends the process even inside a blocked gloo call.
HARD_TIMEOUT = pytest.mark.timeout(120, method="thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_world(kind: str) -> None:
    """Join (or reuse) the default gloo group. Under torchrun the environment says where;
    under mpiexec rank 0 picks a port and broadcasts it with mpi4py."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if kind == TORCHRUN:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        return
    if kind != MPI:
        raise RuntimeError(f"no multi-rank launcher detected ({kind})")
    from mpi4py import MPI as mpi  # imported only under an MPI launch

    comm = mpi.COMM_WORLD
    port = comm.bcast(_free_port() if comm.rank == 0 else None, root=0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo",
        init_method="env://",
        rank=comm.rank,
        world_size=comm.size,
        timeout=COLLECTIVE_TIMEOUT,
    )


@pytest.fixture(scope="module")
def world(launch_kind) -> tuple[int, int]:
    """(rank, world size) of the default gloo group; the group stays up for later modules."""
    import torch.distributed as dist

    if detect_launcher().kind != launch_kind:
        pytest.skip(f"needs a {launch_kind} launch")
    torch.set_num_threads(1)
    # Build the tiny models before joining the group: once torch.distributed is up,
    # transformers' save_pretrained writes weights on global rank 0 only, so a model built
    # by another rank would be saved without its text encoder weights.
    for family in BUILT_FAMILIES:
        ensure_tiny_model(family)
    init_world(launch_kind)
    size = dist.get_world_size()
    if size % 2:
        pytest.skip(f"needs an even number of ranks, got {size}")
    return dist.get_rank(), size


def verdict_on_all_ranks(body: Callable[[], tuple[bool, str]]) -> None:
    """Run ``body`` (-> ok, detail), gather every rank's verdict, then assert the same on all."""
    import torch.distributed as dist

    try:
        ok, detail = body()
    except Exception:  # noqa: BLE001 - reported collectively below
        ok, detail = False, traceback.format_exc(limit=8)
    verdicts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (bool(ok), detail))
    failed = [f"rank {rank}: {text}" for rank, (passed, text) in enumerate(verdicts) if not passed]
    assert not failed, "\n".join(failed)


def load(family: str) -> Any:

    return load_pipeline(str(ensure_tiny_model(family)), None, torch.float32)


def generate(pipeline: Any, guidance: float) -> np.ndarray:
    """Two prompts, fixed seeds, 64x64, 4 steps, float pixels in [0, 1]."""
    params = inspect.signature(pipeline.__call__).parameters
    extra = {name: False for name in ("use_resolution_binning", "clean_caption") if name in params}
    with torch.inference_mode():
        result = pipeline(
            prompt=PROMPTS,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in SEEDS],
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            height=64,
            width=64,
            output_type="np",
            **extra,
        )
    return np.asarray(result.images, dtype=np.float64)


def max_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first - second).max())


@pytest.fixture(scope="module")
def references(world) -> dict[tuple[str, float], np.ndarray]:
    """Single-rank images of every family, guided and not, computed on every rank."""
    images = {}
    for family in FAMILIES:
        pipeline = load(family)
        for guidance in (GUIDED, UNGUIDED):
            images[family, guidance] = generate(pipeline, guidance)
    return images


@pytest.fixture(scope="module")
def tp_mesh(world):

    layout = ParallelLayout(world[1], tp=2)
    return layout, build_device_mesh(layout, "cpu")


@pytest.fixture(scope="module")
def cfg_mesh(world):

    layout = ParallelLayout(world[1], cfg=2)
    return layout, build_device_mesh(layout, "cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_single_rank(family, references, tp_mesh):

    layout, mesh = tp_mesh

    def body():
        pipeline = load(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        denoiser = pipeline.unet if family == "tiny-unet" else pipeline.transformer
        heads = {path: denoiser.get_submodule(path).heads for path in report.tp.attention}
        difference = max_difference(generate(pipeline, GUIDED), references[family, GUIDED])
        ok = (
            difference <= TOLERANCE
            and report.tp.attention
            and report.tp.feedforward
            and not report.tp.skipped
            and report.tp.param_bytes_after < report.tp.param_bytes_before
            and all(count == 2 for count in heads.values())  # 4 heads -> 2 per rank
        )
        return ok, f"max difference {difference:.2e}; {report.summary()}; local heads {heads}"

    verdict_on_all_ranks(body)


def test_plain_split_of_geglu_is_wrong(references, tp_mesh):
    """Without the row permutation, rank 0 holds all of GEGLU's hidden half and rank 1 all of
    its gate half: the images differ clearly, which is why the permutation exists."""

    _, mesh = tp_mesh

    def body():
        pipeline = load("tiny-unet")
        report = apply_tensor_parallel(pipeline.unet, mesh["tp"], permute_gated=False)
        difference = max_difference(generate(pipeline, GUIDED), references["tiny-unet", GUIDED])
        return difference > 20 * TOLERANCE and len(
            report.gated
        ) > 0, f"max difference {difference:.3f}"

    verdict_on_all_ranks(body)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parallel_matches_single_rank(family, references, cfg_mesh):

    layout, mesh = cfg_mesh

    def body():
        pipeline = load(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(generate(pipeline, GUIDED), references[family, GUIDED])
        calls = (report.cfg.split_calls, report.cfg.whole_calls)
        ok = difference <= TOLERANCE and calls == (STEPS, 0) and report.tp is None
        return ok, f"max difference {difference:.2e}; (split, whole) calls {calls}"

    verdict_on_all_ranks(body)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parallel_without_guidance_runs_unchanged(family, references, cfg_mesh):

    layout, mesh = cfg_mesh

    def body():
        pipeline = load(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        difference = max_difference(generate(pipeline, UNGUIDED), references[family, UNGUIDED])
        calls = (report.cfg.split_calls, report.cfg.whole_calls)
        denoiser = report.cfg.denoiser
        removed = disable_cfg_parallel(denoiser) and "forward" not in denoiser.__dict__
        ok = difference == 0.0 and calls == (0, STEPS) and removed
        return (
            ok,
            f"max difference {difference:.2e}; (split, whole) calls {calls}; removed {removed}",
        )

    verdict_on_all_ranks(body)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_with_dtensor_dispatch_matches_single_rank(family, references, tp_mesh):
    """torch's stock ColwiseParallel/RowwiseParallel runtime gives the same images."""

    _, mesh = tp_mesh

    def body():
        pipeline = load(family)
        apply_tensor_parallel(denoiser_of(pipeline)[1], mesh["tp"], dtensor_forward=True)
        difference = max_difference(generate(pipeline, GUIDED), references[family, GUIDED])
        return difference <= TOLERANCE, f"max difference {difference:.2e}"

    verdict_on_all_ranks(body)


def tiny_sd3():
    """SD3 joint attention: add_q/k/v_proj colwise, to_add_out rowwise, per-head RMS qk-norm."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=16, qk_norm="rms_norm",
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
        "pooled_projections": torch.randn(2, 16, generator=generator),
        "timestep": torch.tensor([500, 500]),
    }
    return model.eval(), inputs


def tiny_flux():
    """Flux: double blocks sharded, and the single blocks (attention without output projection,
    proj_mlp, packed proj_out) too."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=generator),
        "pooled_projections": torch.randn(1, 16, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.randn(16, 3, generator=generator),
        "txt_ids": torch.randn(5, 3, generator=generator),
    }
    return model.eval(), inputs


@pytest.mark.parametrize("build", [tiny_sd3, tiny_flux], ids=["sd3", "flux"])
def test_tp2_joint_attention_denoisers_match_unsharded(build, tp_mesh):

    _, mesh = tp_mesh

    def body():
        model, inputs = build()
        with torch.inference_mode():
            expected = model(**inputs, return_dict=False)[0]
        report = apply_tensor_parallel(model, mesh["tp"])
        with torch.inference_mode():
            got = model(**inputs, return_dict=False)[0]
        difference = float((got - expected).abs().max())
        joint = [
            path
            for path in report.attention
            if getattr(model.get_submodule(path), "add_q_proj", None) is not None
        ]
        ok = (
            difference <= 1e-5
            and joint
            and all("pre_only" in why for why in report.skipped.values())
        )
        return ok, f"max difference {difference:.2e}; {report.summary()}"

    verdict_on_all_ranks(body)


@pytest.fixture(scope="module")
def tp_cfg_mesh(world):

    if world[1] % 4:
        pytest.skip("tp=2 with cfg=2 needs a multiple of 4 ranks (torchrun --nproc-per-node 4)")
    layout = ParallelLayout(world[1], tp=2, cfg=2)
    return layout, build_device_mesh(layout, "cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_and_cfg2_together_match_single_rank(family, references, tp_cfg_mesh):
    """Heads split inside each guidance branch; runs with 4 (or 8, ...) ranks only."""

    layout, mesh = tp_cfg_mesh

    def body():
        pipeline = load(family)
        report = parallelize_pipeline(pipeline, layout, mesh)
        guided = max_difference(generate(pipeline, GUIDED), references[family, GUIDED])
        unguided = max_difference(generate(pipeline, UNGUIDED), references[family, UNGUIDED])
        calls = (report.cfg.split_calls, report.cfg.whole_calls)
        ok = max(guided, unguided) <= TOLERANCE and calls == (STEPS, STEPS)
        return ok, f"max difference {guided:.2e} guided, {unguided:.2e} unguided; calls {calls}"

    verdict_on_all_ranks(body)


CACHES = ("first-block:0.2", "taylorseer:2", "pab", "faster")


@pytest.fixture(scope="module")
def cached_references(world) -> dict[tuple[str, bool], np.ndarray]:
    """Single-rank images of the tiny DiT under each step cache, computed on every rank."""

    images = {}
    for spec in CACHES:
        for split in (False, True):
            pipeline = load("tiny-dit")
            cache = enable_step_cache(pipeline, spec, guidance_split=split)
            with cache.call():
                images[spec, split] = generate(pipeline, GUIDED)
    return images


@pytest.mark.parametrize("spec", CACHES)
@pytest.mark.parametrize("mesh_name", ["tp_mesh", "cfg_mesh"])
def test_step_cache_under_tp_or_cfg_matches_single_rank_cached(
    spec, mesh_name, cached_references, request
):
    """The hooks wrap the sharded blocks (TP) or see each rank's guidance half (CFG): the
    images are the single-rank cached ones, twice in a row (hook state is reset per call), and
    no rank skips a collective the other runs (first-block's skip decision is the same on
    both TP ranks, since it reads all-reduced activations)."""

    layout, mesh = request.getfixturevalue(mesh_name)

    def body():
        pipeline = load("tiny-dit")
        parallelize_pipeline(pipeline, layout, mesh)
        split = mesh_name == "cfg_mesh"
        cache = enable_step_cache(pipeline, spec, guidance_split=split)
        runs = []
        for _ in range(2):
            with cache.call():
                runs.append(generate(pipeline, GUIDED))
        difference = max_difference(runs[0], cached_references[spec, split])
        ok = difference <= TOLERANCE and np.array_equal(runs[0], runs[1]) and cache.modules > 0
        return ok, f"max difference {difference:.2e}; hooked modules {cache.modules}"

    verdict_on_all_ranks(body)


@pytest.mark.parametrize(
    "degrees", [{"tp": 2}, {"cfg": 2}, {"ulysses": 2}], ids=["tp2", "cfg2", "ulysses2"]
)
def test_a_parallelized_pipeline_is_freed_once_dropped(degrees, world):
    """Nothing outside the pipeline keeps it alive after TP/CFG/SP and a step cache: no
    global registry of wrappers, processors or hooks (what DiffusionWorker.shutdown and
    sleep(2) rely on to free the weights; weakrefs are dead after a collection)."""

    layout = ParallelLayout(world[1], **degrees)
    mesh = build_device_mesh(layout, "cpu")

    def body():
        pipeline = load("tiny-dit")
        report = parallelize_pipeline(pipeline, layout, mesh)
        cache = enable_step_cache(pipeline, "pab", guidance_split="cfg" in degrees)
        with cache.call():
            generate(pipeline, GUIDED)
        refs = [weakref.ref(pipeline), weakref.ref(pipeline.transformer), weakref.ref(pipeline.vae)]
        del pipeline, report, cache
        gc.collect()
        alive = [ref() is not None for ref in refs]
        return not any(alive), f"alive after release (pipeline, transformer, vae): {alive}"

    verdict_on_all_ranks(body)
