"""Shared tiny components: text encoders, VAEs and schedulers in the layouts the families use.

Widths are kept small (a tiny model runs a step in milliseconds on one CPU core) but every
head count divides by 4 and every image sequence by 4, so 2- and 4-way tensor, sequence and
CFG parallel layouts all apply.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, transformers)

from __future__ import annotations

VOCAB_SIZE = 1000
HIDDEN = 32


def clip_text_encoder(tokenizer, projection: bool = False, hidden: int = HIDDEN):
    """CLIP text encoder; ``projection``: CLIPTextModelWithProjection (SDXL's and SD3's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(tokenizer, umt5: bool = False, d_model: int = HIDDEN):
    """T5 encoder (PixArt, Flux, SD3, LTX); ``umt5``: its UMT5 variant, the class Wan declares."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    model, config = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    return model(
        config(
            d_model=d_model,
            d_ff=2 * d_model,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            vocab_size=VOCAB_SIZE,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def gemma2_encoder(tokenizer, hidden: int = HIDDEN):
    """Gemma 2 decoder used as a text encoder (Sana)."""
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(
        Gemma2Config(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=max(len(tokenizer), 128),
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
        )
    )


def qwen25_vl_encoder(tokenizer, hidden: int = HIDDEN):
    """Qwen2.5-VL, whose language model encodes Qwen-Image's prompts (the vision tower is
    built tiny too, and never runs for text-to-image)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = max(len(tokenizer), 300)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "max_position_embeddings": 2048,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
        },
        vocab_size=vocab,
        image_token_id=vocab - 1,
        video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def kl_vae(latent_channels: int = 4, **config):
    """The 4-level AutoencoderKL (8x spatial compression) of SD 1.x/SDXL/PixArt, and with
    ``shift_factor``/no quant convs, of SD3 and Flux."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
