"""Step caching through diffusers' cache hooks: ``--cache KIND[:VALUE]``.

Consecutive denoising steps compute nearly the same block outputs; a step cache reuses
(or extrapolates) them instead of recomputing. The hooks are diffusers' own
(``diffusers.hooks``); this module picks the config for a kind, applies it to the
denoiser, and supplies what diffusers leaves to the pipeline:

- a *cache context*. diffusers keys hook state by ``model.cache_context(name)``, which only
  some pipelines set (Wan, Flux, ...); PixArt and the UNet pipelines set none and every
  hook fails with "No cache context is set". :meth:`StepCache.call` wraps each pipeline call in
  one context (a pipeline that sets its own, per guidance branch, overrides it inside) and
  resets the hook state afterwards, so no state leaks from one batch into the next, even
  when a call fails;
- the *current timestep* that pyramid attention broadcast and FasterCache skip on: a hook
  on the denoiser, outside the cache's own, records the ``timestep`` argument of each call.

Hooks are applied through the functions ``diffusers.hooks.apply_*``, not
``model.enable_cache``, because denoisers without diffusers' ``CacheMixin``
(``PixArtTransformer2DModel``) take the hooks as well.

Kinds and what VALUE means (hooks of the installed diffusers; 0.42 has all four):

=============  ===================================================  ===========
kind           VALUE                                                default
=============  ===================================================  ===========
first-block    residual-change threshold below which the later      0.05
               blocks are skipped (higher: faster, less exact)
taylorseer     steps between full computations (Taylor-predicted     5
               in between)
pab            pyramid attention broadcast: self-attention reused    2
               for VALUE steps (temporal 2x, cross-attention 3x)
faster         FasterCache: attention reused every VALUE steps,      2
               unconditional branch approximated where batched
=============  ===================================================  ===========
"""

# ruff: noqa: PLC0415 - diffusers and torch are imported on first use: parsing --cache stays light

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from spmd_diffusion.models.hooks import wrap_forward
from spmd_diffusion.models.options import denoiser_of

CACHE_KINDS = {"first-block": 0.05, "taylorseer": 5, "pab": 2, "faster": 2}
CONTEXT_NAME = "batch"
TIMESTEP_HOOK = "spmd_cache_timestep"
# diffusers' default TaylorSeer patterns end in "attn" and are matched whole, so they miss
# attention layers named attn1/attn2 (PixArt, Wan, ...): these match both.
TAYLORSEER_IDENTIFIERS = [
    r"^blocks\.\d+\.attn\d*$",
    r"^transformer_blocks\.\d+\.attn\d*$",
    r"^single_transformer_blocks\.\d+\.attn\d*$",
    r"^temporal_transformer_blocks\.\d+\.attn\d*$",
]


@dataclass(frozen=True)
class CacheSpec:
    """One ``--cache`` value: the kind and its number (``None``: the kind's default)."""

    kind: str
    value: float | None = None

    @property
    def setting(self) -> float:
        return CACHE_KINDS[self.kind] if self.value is None else self.value

    def __str__(self) -> str:
        return f"{self.kind}:{self.setting:g}"


def parse_cache(text: str) -> CacheSpec:
    """``KIND`` or ``KIND:VALUE``; a clear error for anything else (no diffusers import)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"cache must be KIND[:VALUE], got {text!r}")
    kind, _, value_text = text.partition(":")
    kind = kind.strip().lower()
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind {kind!r} is not one of {', '.join(CACHE_KINDS)}")
    if not value_text:
        return CacheSpec(kind)
    try:
        value = float(value_text)
    except ValueError:
        raise ValueError(f"cache {text!r}: the value after ':' must be a number") from None
    integral = isinstance(CACHE_KINDS[kind], int)
    if integral and (value != int(value) or value < 1):
        raise ValueError(f"cache {kind}: VALUE is a whole number of steps >= 1, got {value_text!r}")
    if not integral and not 0 < value < 10:
        raise ValueError(f"cache {kind}: VALUE is a threshold in (0, 10), got {value_text!r}")
    return CacheSpec(kind, int(value) if integral else value)


class TimestepProbe:
    """The timestep of the denoiser's latest call, as a float, for hooks that skip by timestep.
    A hook on the denoiser (:mod:`spmd_diffusion.models.hooks`) registered after the cache's
    own, so it records each call's timestep before they read it."""

    def __init__(self) -> None:
        self.timestep = 1000.0

    def forward(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        value = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if value is not None:
            self.timestep = float(value.flatten()[0]) if hasattr(value, "flatten") else float(value)
        return inner(*args, **kwargs)

    def __call__(self) -> float:
        return self.timestep


def _runs_branches_apart(pipeline: Any) -> bool:
    """Does the pipeline call the denoiser once per guidance branch (``cache_context("uncond")``)
    rather than on one doubled batch? FasterCache's unconditional-branch skip splits a doubled
    batch, so it must stay off for such pipelines."""
    try:
        return 'cache_context("uncond"' in inspect.getsource(type(pipeline).__call__)
    except (OSError, TypeError):
        return True  # unknown: the safe answer


def build_cache_config(
    spec: CacheSpec,
    pipeline: Any,
    denoiser: Any,
    timestep: TimestepProbe,
    guidance_split: bool = False,
) -> Any:
    """diffusers' config object for ``spec`` on this pipeline's denoiser. ``guidance_split``:
    CFG parallel runs the two guidance branches on two ranks at once, so FasterCache's skip of
    the unconditional branch would save no time -- and it would hand each rank a batch other
    than its half, mixing up the block caches' samples (visibly off the single-rank image);
    it is turned off there."""
    from diffusers import hooks

    setting = spec.setting
    if spec.kind == "first-block":
        return hooks.FirstBlockCacheConfig(threshold=float(setting))
    if spec.kind == "taylorseer":
        import torch

        return hooks.TaylorSeerCacheConfig(
            cache_interval=int(setting),
            taylor_factors_dtype=torch.float32,
            cache_identifiers=TAYLORSEER_IDENTIFIERS,
        )
    if spec.kind == "pab":
        return hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(setting),
            temporal_attention_block_skip_range=2 * int(setting),
            cross_attention_block_skip_range=3 * int(setting),
            current_timestep_callback=timestep,
        )
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
    video = (isinstance(patch, (tuple, list)) and len(patch) == 3) or "3D" in type(
        denoiser
    ).__name__
    return hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=int(setting),
        current_timestep_callback=timestep,
        tensor_format="BCFHW" if video else "BCHW",
        is_guidance_distilled=guidance_split or _runs_branches_apart(pipeline),
    )


APPLY = {
    "first-block": "apply_first_block_cache",
    "taylorseer": "apply_taylorseer_cache",
    "pab": "apply_pyramid_attention_broadcast",
    "faster": "apply_faster_cache",
}


def hook_names(denoiser: Any) -> dict[str, set[str]]:
    """The diffusers hooks on each module of the denoiser ("" is the denoiser itself)."""
    return {
        name: set(getattr(getattr(module, "_diffusers_hook", None), "hooks", None) or ())
        for name, module in denoiser.named_modules()
    }


class StepCache:
    """The cache hooks of one denoiser, applied once at load time; ``call()`` per pipeline call."""

    def __init__(
        self, spec: CacheSpec, pipeline: Any, denoiser: Any, guidance_split: bool = False
    ) -> None:
        from diffusers import hooks

        self.spec = spec
        self.denoiser = denoiser
        self.timestep = TimestepProbe()
        config = build_cache_config(spec, pipeline, denoiser, self.timestep, guidance_split)
        before = hook_names(denoiser)  # parallel modes' hooks, there before the cache's
        try:
            getattr(hooks, APPLY[spec.kind])(denoiser, config)
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"cache {spec.kind} does not apply to {type(denoiser).__name__}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        hooked = {
            name for name, names in hook_names(denoiser).items() if names - before.get(name, set())
        }
        self.modules = len(hooked - {""})  # the sub-modules the cache hooked
        if not hooked:
            raise ValueError(
                f"cache {spec.kind}: no block of {type(denoiser).__name__} takes this cache "
                "(diffusers' hooks found no transformer block or attention layer to wrap)"
            )
        wrap_forward(denoiser, TIMESTEP_HOOK, self.timestep)  # outside the cache's hooks
        # As enable_cache does: the new block hooks must get the cache contexts.
        hooks.HookRegistry.check_if_exists_or_initialize(
            denoiser
        ).invalidate_child_registries_cache()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """One pipeline call under a cache context; hook state is reset afterwards."""
        from diffusers.hooks import HookRegistry
        from diffusers.models.cache_utils import CacheMixin

        try:
            with CacheMixin.cache_context(self.denoiser, CONTEXT_NAME):
                yield
        finally:
            HookRegistry.check_if_exists_or_initialize(self.denoiser).reset_stateful_hooks(
                recurse=True
            )
            self.timestep.timestep = 1000.0

    def report(self) -> dict[str, Any]:
        return {"cache": str(self.spec), "cache_hooked_modules": self.modules}


UNET_KINDS = ("pab",)
# (denoiser class, kind) -> why diffusers' hooks cannot run there: found by running every kind
# on every embedded family (tests/models/test_step_cache.py keeps the table honest).
UNSUPPORTED = {
    (
        "SD3Transformer2DModel",
        "first-block",
    ): "SD3's last block returns no text stream (context_pre_only), which "
    "diffusers' first-block cache subtracts",
    (
        "SanaTransformer2DModel",
        "first-block",
    ): "diffusers' first-block cache has no block registry for Sana's blocks",
    (
        "SD3Transformer2DModel",
        "faster",
    ): "diffusers' FasterCache splits SD3's guidance batch by the wrong size",
    (
        "FluxTransformer2DModel",
        "faster",
    ): "diffusers' FasterCache finds no guidance batch in Flux's calls",
    (
        "QwenImageTransformer2DModel",
        "faster",
    ): "diffusers' FasterCache finds no guidance batch in Qwen-Image's calls (one per branch)",
    (
        "LTXVideoTransformer3DModel",
        "faster",
    ): "diffusers' FasterCache's attention hook does not fit LTX's full-width attention layout",
}


def check_cache_for_pipeline(
    spec: CacheSpec, class_name: str | None, denoiser_class: str | None = None
) -> None:
    """Before loading: the block caches need a transformer denoiser. A UNet pipeline's
    transformer blocks sit deep inside its down/up blocks, where first-block cache and
    TaylorSeer find nothing to wrap and FasterCache splits the scalar timestep; only
    pyramid attention broadcast, which wraps attention layers wherever they are, runs. Some
    kinds fail on some transformers (:data:`UNSUPPORTED`), refused here naming the reason."""
    import diffusers

    why = UNSUPPORTED.get((denoiser_class or "", spec.kind))
    if why is not None:
        runs = [kind for kind in CACHE_KINDS if (denoiser_class, kind) not in UNSUPPORTED]
        raise ValueError(
            f"cache {spec.kind} cannot run on {denoiser_class}: {why}; it takes --cache "
            f"{' / '.join(runs)}"
        )
    cls = getattr(diffusers, class_name, None) if class_name else None
    if cls is None or spec.kind in UNET_KINDS:
        return
    parameters = inspect.signature(cls.__init__).parameters
    if "unet" in parameters and "transformer" not in parameters:
        raise ValueError(
            f"cache {spec.kind} needs a transformer denoiser and {class_name} has a UNet; "
            f"use --cache {' or '.join(UNET_KINDS)} for UNet pipelines"
        )


def enable_step_cache(pipeline: Any, text: str, guidance_split: bool = False) -> StepCache:
    """Apply ``--cache`` ``text`` to the pipeline's denoiser (``guidance_split``: CFG parallel)."""
    _, denoiser = denoiser_of(pipeline, "cache")
    spec = parse_cache(text)
    check_cache_for_pipeline(spec, type(pipeline).__name__, type(denoiser).__name__)
    return StepCache(spec, pipeline, denoiser, guidance_split)
