"""Build a Stable-Diffusion-1.5-sized pipeline with random weights and save it locally.

    python scripts/gpu_check_build_sd15.py OUTPUT_DIR [--device cuda] [--small] [--dtype float16]

Full size (default): the UNet2DConditionModel of SD 1.5 (block widths 320/640/1280/1280,
2 layers per block, 8 heads, cross-attention 768; ~860M parameters), a CLIP-L-sized
CLIPTextModel (12 layers, width 768, 12 heads, vocabulary 49408, 77 positions; ~123M),
the SD VAE (AutoencoderKL 128/256/512/512; ~84M) and SD 1.5's PNDM scheduler. The
tokenizer is the small byte-level CLIP tokenizer of the embedded tiny-unet model (built
offline; its ids all lie inside the 49408-row embedding), with 77 positions.

``--small`` builds a downsized model of the same layout (for the CPU smoke run of
scripts/gpu_check.sh). Weights are initialised on ``--device`` (a GPU initialises the
~1B parameters in well under a second; on a CPU that takes a while) and saved in
``--dtype`` with ``save_pretrained`` (safetensors), so any tool loads it with
``from_pretrained``. Writes ``OUTPUT_DIR/gpu_check_model.json`` with the parameter counts.
Only public diffusers/transformers API and ``spmd_diffusion.models.ensure_tiny_model``.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch, transformers); project
# modules load where used (models): they pull in heavy modules or import back into this one

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)

# Same layout, a few MB: for exercising every code path on a CPU.
SMALL_UNET = {
    **SD15_UNET,
    "sample_size": 8,
    "block_out_channels": (32, 64, 64, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
}
SMALL_TEXT = {
    **SD15_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
SMALL_VAE = {
    **SD15_VAE,
    "block_out_channels": (32, 32, 64, 64),
    "layers_per_block": 1,
    "sample_size": 64,
}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(output: Path, device: str, small: bool, dtype_name: str, seed: int) -> dict:
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from spmd_diffusion.models import ensure_tiny_model

    diffusers_logging.disable_progress_bar()
    start = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(
        str(ensure_tiny_model("tiny-unet") / "tokenizer"), model_max_length=77
    )
    text_cfg = dict(SMALL_TEXT if small else SD15_TEXT)
    text_cfg.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it is fast
        unet = UNet2DConditionModel(**(SMALL_UNET if small else SD15_UNET))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        vae = AutoencoderKL(**(SMALL_VAE if small else SD15_VAE))
    dtype = getattr(torch, dtype_name)
    for module in (unet, text_encoder, vae):
        module.to(device="cpu", dtype=dtype).eval()  # saved from host memory
    init_s = time.perf_counter() - start
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(str(staging), safe_serialization=True)
    info = {
        "layout": "small" if small else "sd15",
        "dtype": dtype_name,
        "built_on": device,
        "seed": seed,
        "parameters": {"unet": count(unet), "text_encoder": count(text_encoder), "vae": count(vae)},
        "init_seconds": round(init_s, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "bytes_on_disk": sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()),
    }
    (staging / "gpu_check_model.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--device", default="cuda", help="where to initialise the weights (cuda or cpu)"
    )
    parser.add_argument(
        "--small", action="store_true", help="downsized model of the same layout (CPU smoke)"
    )
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = build(args.output, args.device, args.small, args.dtype, args.seed)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
