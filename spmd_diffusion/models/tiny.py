"""Tiny random-weight diffusers pipelines, built and saved locally.

They are the embedded default model (the demo runs on a machine that can download
nothing) and the test models. They are saved with ``save_pretrained`` and loaded back
through the same ``from_pretrained`` code path as a real checkpoint. Weights come from a
fixed seed, so every rank and every machine builds bit-identical models.

- ``unet``: Stable Diffusion 1.x layout (CLIP text encoder, UNet2DConditionModel with
  cross-attention and GEGLU feed-forward, 4-level VAE, so sizes are multiples of 8).
- ``dit``: PixArt-alpha layout (T5 encoder, PixArtTransformer2DModel, same VAE).
- ``video``: Wan 2.1 text-to-video layout (T5 encoder, WanTransformer3DModel, the causal 3-D
  AutoencoderKLWan: 8x spatial and 4x temporal compression, so frame counts are 4k + 1).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ARCHES = ("unet", "dit", "video")
TINY_MODEL_VERSION = 1
VOCAB_SIZE = 1000
HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tiny_clip_tokenizer(directory: Path) -> None:
    """A byte-level BPE vocabulary (single bytes and a few merges) in CLIP's file format."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = ["t h", "a n", "i n", "o n", "e r", "r e", "th e</w>", "a n</w>", "o f</w>"]
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _tiny_tokenizer(workdir: Path):
    from transformers import CLIPTokenizer

    source = workdir / "tokenizer-src"
    write_tiny_clip_tokenizer(source)
    tokenizer = CLIPTokenizer.from_pretrained(str(source), model_max_length=77)
    assert len(tokenizer) <= VOCAB_SIZE
    return tokenizer


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_unet_pipeline(workdir: Path):
    """Stable Diffusion 1.x layout with CLIP text encoder; GEGLU feed-forwards."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer(workdir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=4,  # diffusers' SD-1.x naming: this is the number of heads
        norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_t5(tokenizer, umt5: bool = False):
    """T5 encoder (PixArt); ``umt5``: its UMT5 variant, the class Wan's pipeline declares."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    model, config = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return model(
        config(
            d_model=HIDDEN,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            vocab_size=VOCAB_SIZE,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny_dit_pipeline(workdir: Path):
    """PixArt-alpha layout: T5 encoder and a transformer denoiser (patch 2, 4 heads)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    tokenizer = _tiny_tokenizer(workdir)
    text_encoder = _tiny_t5(tokenizer)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=HIDDEN,
        caption_channels=HIDDEN,
        norm_num_groups=8,
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_vae(),
        transformer=transformer,
        scheduler=_tiny_scheduler(),
    )


CALL_DEFAULTS = {"video": {"height": 64, "width": 64, "num_frames": 9}}


def build_tiny_video_pipeline(workdir: Path):
    """Wan 2.1 text-to-video layout: T5 encoder, a 2-block WanTransformer3DModel (patch
    1x2x2, 4 heads, RMS qk-norm), the 3-D causal Wan VAE, flow-matching Euler scheduler."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = _tiny_tokenizer(workdir)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        text_dim=HIDDEN,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5(tokenizer, umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


BUILDERS = {"unet": build_tiny_unet_pipeline, "dit": build_tiny_dit_pipeline, "video": build_tiny_video_pipeline}


def check_saved_weights(pipeline, directory: Path) -> None:
    """Every network component must have written its weights. (transformers writes them on
    rank 0 only once torch.distributed is initialised: such a save must fail here, loudly,
    rather than leave a model without weights marked complete.)"""
    import torch

    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module) and not any((directory / name).glob("*.safetensors")):
            raise RuntimeError(f"tiny model component {name!r} was saved without weights in {directory}")


def build_in_subprocess(directory: Path, arch: str) -> None:
    """Build in a fresh process: this one has joined a process group (see check_saved_weights)."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "spmd_diffusion", "make-tiny-model", str(directory), "--arch", arch],
        check=True, stdout=subprocess.DEVNULL,
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
            json.dumps({"arch": arch, "seed": seed, "version": TINY_MODEL_VERSION,
                        **({"call_defaults": CALL_DEFAULTS[arch]} if arch in CALL_DEFAULTS else {})})
        )
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
