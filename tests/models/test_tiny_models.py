"""Tiny pipelines: built from a fixed seed, saved, and loaded through from_pretrained."""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from spmd_diffusion.entrypoints.cli import cli
from spmd_diffusion.models import (
    check_model_reference,
    ensure_tiny_model,
    load_pipeline,
    resolve_model_path,
)
from spmd_diffusion.models import loader as models
from spmd_diffusion.models.tiny import CALL_DEFAULTS

pytestmark = pytest.mark.slow


def _weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


FAMILIES = [
    ("unet", "StableDiffusionPipeline"),
    ("sdxl", "StableDiffusionXLPipeline"),
    ("dit", "PixArtAlphaPipeline"),
    ("sd3", "StableDiffusion3Pipeline"),
    ("flux", "FluxPipeline"),
    ("qwen-image", "QwenImagePipeline"),
    ("sana", "SanaPipeline"),
    ("video", "WanPipeline"),
    ("ltx", "LTXPipeline"),
]


@pytest.mark.parametrize("arch, pipeline_name", FAMILIES, ids=[arch for arch, _ in FAMILIES])
def test_make_tiny_model_command_saves_a_loadable_pipeline(tmp_path, arch, pipeline_name):
    import torch

    result = CliRunner().invoke(cli, ["make-tiny-model", str(tmp_path / arch), "--arch", arch])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / arch / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_name
    pipeline = load_pipeline(str(tmp_path / arch), None, torch.float32)
    assert type(pipeline).__name__ == pipeline_name
    assert (
        load_pipeline(str(tmp_path / arch), pipeline_name, torch.float32).__class__.__name__
        == pipeline_name
    )
    marker = json.loads((tmp_path / arch / "tiny_model.json").read_text())
    # the families whose own defaults are 1024x1024 images, long videos or long prompts carry
    # small ones
    assert marker.get("call_defaults") == CALL_DEFAULTS.get(arch)
    assert arch in ("unet", "sdxl", "dit") or marker["call_defaults"]["height"] == 64


def test_builds_are_bit_identical(tmp_path, tiny_unet):
    CliRunner().invoke(cli, ["make-tiny-model", str(tmp_path / "again"), "--arch", "unet"])
    assert _weights_digest(tmp_path / "again") == _weights_digest(Path(tiny_unet))


def test_model_references(tmp_path, tiny_unet):
    assert resolve_model_path("tiny-unet") == tiny_unet
    assert resolve_model_path(tiny_unet) == tiny_unet
    check_model_reference("some-org/some-model")  # a hub id is accepted as such
    with pytest.raises(ValueError, match="does not exist"):
        check_model_reference(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no model_index.json"):
        check_model_reference(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model 'tiny-nothing'"):
        check_model_reference("tiny-nothing")


def test_unknown_pipeline_class_is_refused(tiny_unet):
    import torch

    with pytest.raises(ValueError, match="MyModel.*not a diffusers pipeline class"):
        load_pipeline(tiny_unet, "MyModel", torch.float32)


def test_building_inside_a_process_group_still_saves_every_weight(tmp_path, monkeypatch):
    """transformers saves only on rank 0 once torch.distributed is up: build out of process."""
    import torch.distributed as dist

    def not_in_this_process(*args, **kwargs):
        raise AssertionError("an in-process save would lose weights on ranks other than 0")

    monkeypatch.setattr(models, "make_tiny_model", not_in_this_process)
    monkeypatch.setenv("SPMD_DIFFUSION_CACHE", str(tmp_path / "cache"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        directory = ensure_tiny_model("tiny-dit")
    finally:
        dist.destroy_process_group()
    assert list((directory / "text_encoder").glob("*.safetensors"))
    assert list((directory / "transformer").glob("*.safetensors"))


def test_a_built_model_is_readable_as_the_umask_allows(tmp_path):

    previous = os.umask(0o022)
    try:
        CliRunner().invoke(cli, ["make-tiny-model", str(tmp_path / "m"), "--arch", "unet"])
    finally:
        os.umask(previous)
    modes = {
        path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in [tmp_path / "m", *(tmp_path / "m").rglob("*")]
    }
    assert modes["m"] == 0o755 and modes["m/unet/diffusion_pytorch_model.safetensors"] == 0o644, (
        modes
    )
    assert all(mode in (0o644, 0o755) for mode in modes.values()), modes
