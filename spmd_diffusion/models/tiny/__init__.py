"""Tiny random-weight diffusers pipelines, built and saved locally, one per model family.

They are the embedded default model (the demo runs on a machine that can download
nothing) and the test models. They are saved with ``save_pretrained`` and loaded back
through the same ``from_pretrained`` code path as a real checkpoint. Weights come from a
fixed seed, so every rank and every machine builds bit-identical models. The layouts (see
:mod:`.families`):

- ``unet``: Stable Diffusion 1.x; ``sdxl``: SDXL (two CLIP encoders, text-time conditioning).
- ``dit``: PixArt-alpha; ``sd3``: SD3.5-medium (MMDiT, qk-norm, a dual-attention block);
  ``flux``: FLUX.1-dev (double- and single-stream blocks, guidance-distilled);
  ``qwen-image``: Qwen-Image (Qwen2.5-VL encoder, true CFG); ``sana``: Sana (linear
  attention, GLUMBConv, DC-AE).
- ``video``: Wan 2.1 text-to-video; ``ltx``: LTX-Video.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch)

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from spmd_diffusion.models.tiny.families import BUILDERS
from spmd_diffusion.models.tiny.tokenizers import write_tiny_clip_tokenizer

ARCHES = tuple(BUILDERS)
TINY_MODEL_VERSION = 1
# Pipeline-call defaults stored with a tiny model (``tiny_model.json``): the families' own
# defaults (1024x1024 images, 81- or 161-frame videos, 512-token prompts) would take hours
# on a CPU with random weights and say nothing more.
SMALL_TEXT = {"max_sequence_length": 32}
CALL_DEFAULTS = {
    "video": {"height": 64, "width": 64, "num_frames": 9},
    "ltx": {"height": 64, "width": 64, "num_frames": 9, **SMALL_TEXT},
    "flux": {"height": 64, "width": 64, **SMALL_TEXT},
    "sd3": {"height": 64, "width": 64, **SMALL_TEXT},
    "qwen-image": {"height": 64, "width": 64, **SMALL_TEXT},
    "sana": {"height": 64, "width": 64, **SMALL_TEXT},
}
__all__ = [
    "ARCHES",
    "BUILDERS",
    "CALL_DEFAULTS",
    "TINY_MODEL_VERSION",
    "make_tiny_model",
    "write_tiny_clip_tokenizer",
]


def _apply_umask(directory: Path) -> None:
    """Give the saved model the permissions the umask allows (safetensors writes its files
    0600 and the staging directory is 0700): a cache shared by a team stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def check_saved_weights(pipeline, directory: Path) -> None:
    """Every network component must have written its weights. (transformers writes them on
    rank 0 only once torch.distributed is initialised: such a save must fail here, loudly,
    rather than leave a model without weights marked complete.)"""
    import torch

    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and not any(
            (directory / name).glob("*.safetensors")
        ):
            raise RuntimeError(
                f"tiny model component {name!r} was saved without weights in {directory}"
            )


def build_in_subprocess(directory: Path, arch: str) -> None:
    """Build in a fresh process: this one has joined a process group (see check_saved_weights)."""

    subprocess.run(
        [sys.executable, "-m", "spmd_diffusion", "make-tiny-model", str(directory), "--arch", arch],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def make_tiny_model(directory: str | os.PathLike, arch: str = "unet", seed: int = 0) -> Path:
    """Build a tiny random-weight pipeline of ``arch`` and save it to ``directory``.

    The pipeline is written to a temporary sibling and renamed into place, so a reader
    never sees a half-written model (several ranks may race to build the same one).
    """
    import torch
    from diffusers.utils import logging as diffusers_logging

    if arch not in BUILDERS:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipeline = BUILDERS[arch](staging / "work")
        diffusers_logging.disable_progress_bar()
        pipeline.save_pretrained(str(staging / "model"), safe_serialization=True)
        check_saved_weights(pipeline, staging / "model")
        (staging / "model" / "tiny_model.json").write_text(
            json.dumps(
                {
                    "arch": arch,
                    "seed": seed,
                    "version": TINY_MODEL_VERSION,
                    **({"call_defaults": CALL_DEFAULTS[arch]} if arch in CALL_DEFAULTS else {}),
                }
            )
        )
        _apply_umask(staging / "model")
        if target.exists():
            shutil.rmtree(target)
        try:
            os.rename(staging / "model", target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise  # someone else won the race only if a complete model is there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
