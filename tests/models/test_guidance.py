"""How each family guides (spmd_diffusion.models.guidance): what turns CFG on, what is recorded."""

from __future__ import annotations

from spmd_diffusion.models.guidance import BATCH, BRANCHES, guidance_of


def test_each_family_guides_its_own_way():
    assert guidance_of("StableDiffusionXLPipeline").kind == BATCH
    assert guidance_of("SanaPipeline").switch == "guidance_scale"
    wan = guidance_of("WanPipeline")
    assert (wan.kind, wan.needs_negative) == (BRANCHES, False)
    qwen = guidance_of("QwenImagePipeline", {"guidance_embeds": False})
    assert (qwen.kind, qwen.switch, qwen.needs_negative, qwen.embedded) == (
        BRANCHES,
        "true_cfg_scale",
        True,
        False,
    )
    assert guidance_of("FluxPipeline", {"guidance_embeds": True}).embedded
    assert guidance_of("MyCustomPipeline") is None and guidance_of(None) is None


def test_true_cfg_needs_a_negative_prompt_and_a_scale_above_one():
    qwen = guidance_of("QwenImagePipeline", {})
    assert qwen.guided({"true_cfg_scale": 4.0, "negative_prompt": "bad"})
    assert not qwen.guided({"true_cfg_scale": 4.0, "negative_prompt": None})
    assert not qwen.guided({"true_cfg_scale": 1.0, "negative_prompt": "bad"})
    assert guidance_of("WanPipeline").guided({"guidance_scale": 5.0})
    assert not guidance_of("PixArtAlphaPipeline").guided({"guidance_scale": 1.0})


def test_recorded_guidance_is_what_the_pipeline_used():
    settings = {"guidance_scale": 1.0, "true_cfg_scale": 4.0}
    assert guidance_of("QwenImagePipeline", {}).used({**settings, "negative_prompt": "bad"}) == {
        "true_cfg_scale": 4.0,
        "guidance_scale": None,
    }  # no guidance embedding: guidance_scale ignored
    assert guidance_of("QwenImagePipeline", {}).used(settings) == {
        "true_cfg_scale": None,
        "guidance_scale": None,
    }
    flux = guidance_of("FluxPipeline", {"guidance_embeds": True})
    assert flux.used({"guidance_scale": 3.5, "true_cfg_scale": 1.0}) == {
        "true_cfg_scale": None,
        "guidance_scale": 3.5,
    }
    assert guidance_of("StableDiffusionPipeline").used({"guidance_scale": 7.5}) == {
        "guidance_scale": 7.5
    }
