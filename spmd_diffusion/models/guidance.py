"""How each pipeline family guides, known from its class before anything loads.

Pipelines differ in what turns classifier-free guidance on and what ``guidance_scale`` means:

- most (SD 1.x/XL, PixArt, SD3, Sana, LTX) run it on a doubled batch when ``guidance_scale > 1``;
- Wan calls the denoiser once per branch, also when ``guidance_scale > 1``;
- Qwen-Image and Flux run "true CFG" (one call per branch) only with ``true_cfg_scale > 1``
  *and* a negative prompt; their ``guidance_scale`` feeds a guidance embedding
  (guidance-distilled FLUX.1-dev) where the transformer has one, and is ignored otherwise.

So the manifest records the guidance a pipeline used (never a value it ignored), and
``--cfg-parallel`` is refused when no item of a job would run guided (a rank of every pair
would idle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BATCH, BRANCHES = "batch", "branches"


@dataclass(frozen=True)
class Guidance:
    """What ``kind`` of CFG a pipeline runs, the argument that ``switch``es it on (> 1), and
    whether it needs a negative prompt; ``embedded``: guidance_scale feeds a guidance
    embedding instead (distilled models), so it is used whatever CFG does."""

    kind: str
    switch: str
    needs_negative: bool = False
    embedded: bool = False

    def guided(self, settings: dict[str, Any]) -> bool:
        """Does a call with these settings (the values it runs with) run classifier-free
        guidance?"""
        scale = settings.get(self.switch)
        if scale is None or scale <= 1:
            return False
        return bool(settings.get("negative_prompt")) or not self.needs_negative

    def used(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The guidance values the pipeline really uses; None for one it ignores."""
        used: dict[str, Any] = {}
        if self.switch == "true_cfg_scale":
            used["true_cfg_scale"] = (
                settings.get("true_cfg_scale") if self.guided(settings) else None
            )
            used["guidance_scale"] = settings.get("guidance_scale") if self.embedded else None
        else:
            used["guidance_scale"] = settings.get("guidance_scale")
        return used

    def describe(self, pipeline: str) -> str:
        """How this pipeline guides, for messages."""
        if self.switch == "true_cfg_scale":
            embedding = "; its guidance_scale feeds a guidance embedding" if self.embedded else ""
            return (
                f"{pipeline} guides only with true_cfg_scale > 1 and a negative prompt{embedding}"
            )
        return f"{pipeline} guides when guidance_scale > 1"


PREFIXES = (  # class-name prefix -> (kind, switch, needs a negative prompt)
    ("QwenImage", BRANCHES, "true_cfg_scale", True),
    ("Flux", BRANCHES, "true_cfg_scale", True),
    ("Wan", BRANCHES, "guidance_scale", False),
    ("StableDiffusion", BATCH, "guidance_scale", False),
    ("PixArt", BATCH, "guidance_scale", False),
    ("Sana", BATCH, "guidance_scale", False),
    ("LTX", BATCH, "guidance_scale", False),
)


def guidance_of(
    pipeline: str | None, denoiser_config: dict[str, Any] | None = None
) -> Guidance | None:
    """The guidance rule of a pipeline class (None: a class the tool makes no claim about).
    ``denoiser_config`` (its transformer's config) says whether guidance is embedded."""
    if not pipeline:
        return None
    for prefix, kind, switch, negative in PREFIXES:
        if pipeline.startswith(prefix):
            embedded = (
                bool((denoiser_config or {}).get("guidance_embeds")) and switch == "true_cfg_scale"
            )
            return Guidance(kind, switch, negative, embedded)
    return None
