"""One builder per model family: a tiny random-weight pipeline in the family's real layout
(its pipeline class, denoiser class, VAE class, text encoders and tokenizer classes).

Each returns an unsaved pipeline; :func:`spmd_diffusion.models.tiny.make_tiny_model` seeds,
saves and marks it. Denoisers have 4 heads of width 8 and 2+ blocks of every block type the
real model has, so every parallel mode applies to them as to the real model.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers)

from __future__ import annotations

from pathlib import Path

from spmd_diffusion.models.tiny.components import (
    HIDDEN,
    clip_text_encoder,
    ddim_scheduler,
    gemma2_encoder,
    kl_vae,
    qwen25_vl_encoder,
    t5_encoder,
)
from spmd_diffusion.models.tiny.tokenizers import (
    clip_tokenizer,
    gemma_tokenizer,
    qwen2_tokenizer,
    t5_tokenizer,
)

HEADS, HEAD_DIM = 4, 8


def build_unet(workdir: Path):
    """Stable Diffusion 1.x layout with CLIP text encoder; GEGLU feed-forwards."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer(workdir)
    text_encoder = clip_text_encoder(tokenizer)
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
        vae=kl_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_dit(workdir: Path):
    """PixArt-alpha layout: T5 encoder and a transformer denoiser (patch 2, 4 heads)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    tokenizer = clip_tokenizer(workdir)
    text_encoder = t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=HIDDEN,
        caption_channels=HIDDEN,
        norm_num_groups=8,
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=kl_vae(),
        transformer=transformer,
        scheduler=ddim_scheduler(),
    )


def build_video(workdir: Path):
    """Wan 2.1 text-to-video layout: T5 encoder, a 2-block WanTransformer3DModel (patch
    1x2x2, 4 heads, RMS qk-norm across heads), the 3-D causal Wan VAE, flow-matching Euler."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    tokenizer = clip_tokenizer(workdir)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
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
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer, umt5=True),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )


def build_flux(workdir: Path):
    """FLUX.1-dev layout: CLIP + T5 encoders, double- and single-stream blocks, guidance
    embedding (guidance-distilled: no classifier-free guidance), 16-channel packed latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip = clip_tokenizer(workdir)
    t5 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    vae = kl_vae(
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_text_encoder(clip),
        tokenizer=clip,
        text_encoder_2=t5_encoder(t5),
        tokenizer_2=t5,
        transformer=transformer,
    )


def build_sd3(workdir: Path):
    """SD3.5-medium layout: two CLIP encoders with projection and T5, MMDiT blocks with RMS
    qk-norm, a dual-attention first block, classifier-free guidance on a doubled batch."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip = clip_tokenizer(workdir)
    t5 = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=2 * HIDDEN,
        caption_projection_dim=HIDDEN,
        pooled_projection_dim=2 * HIDDEN,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = kl_vae(
        shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_text_encoder(clip, projection=True),
        tokenizer=clip,
        text_encoder_2=clip_text_encoder(clip, projection=True),
        tokenizer_2=clip,
        text_encoder_3=t5_encoder(t5, d_model=2 * HIDDEN),
        tokenizer_3=t5,
    )


def build_sdxl(workdir: Path):
    """SDXL layout: CLIP + CLIP-with-projection, a UNet with text-time conditioning and
    linear-projection transformer blocks, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer(workdir)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
        cross_attention_dim=2 * HIDDEN,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=kl_vae(),
        text_encoder=clip_text_encoder(tokenizer),
        text_encoder_2=clip_text_encoder(tokenizer, True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_qwen_image(workdir: Path):
    """Qwen-Image layout: Qwen2.5-VL text encoder, MMDiT blocks with separate image and text
    MLPs, the Qwen-Image causal VAE, true classifier-free guidance (one denoiser call per
    branch, with a negative prompt)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = qwen2_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=HIDDEN,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=qwen25_vl_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_sana(workdir: Path):
    """Sana layout: Gemma 2 text encoder, linear-attention DiT with GLUMBConv feed-forwards,
    the deep-compression autoencoder (DC-AE), flow-matching DPM-Solver."""
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )

    tokenizer = gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=HIDDEN,
        caption_channels=HIDDEN,
        sample_size=8,
        patch_size=1,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(8, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (5,), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=gemma2_encoder(tokenizer),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )


def build_ltx(workdir: Path):
    """LTX-Video layout: T5 encoder, video DiT with RMS qk-norm across heads, the causal
    LTX video VAE (8x spatial and temporal compression here, so frame counts are 8k + 1)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    t5 = t5_tokenizer()
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=HIDDEN,
        num_layers=2,
        caption_channels=HIDDEN,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=t5_encoder(t5),
        tokenizer=t5,
        transformer=transformer,
    )


PIPELINES = {  # the pipeline class each family saves (model_index.json's _class_name)
    "unet": "StableDiffusionPipeline",
    "dit": "PixArtAlphaPipeline",
    "video": "WanPipeline",
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "qwen-image": "QwenImagePipeline",
    "sana": "SanaPipeline",
    "ltx": "LTXPipeline",
}
BUILDERS = {
    "unet": build_unet,
    "dit": build_dit,
    "video": build_video,
    "flux": build_flux,
    "sd3": build_sd3,
    "sdxl": build_sdxl,
    "qwen-image": build_qwen_image,
    "sana": build_sana,
    "ltx": build_ltx,
}
