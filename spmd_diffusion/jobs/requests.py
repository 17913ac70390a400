"""An item's request: the run-wide settings, overridden by the item's own, checked.

Every request is built and validated by :class:`OmniDiffusionRequest` itself; what is done
once per run (the config's limits, the pipeline's arguments) is done once for the run-wide
settings and again for each item that has settings of its own. Bad input raises
:class:`InputError` naming the item's file and line.
"""

# ruff: noqa: PLC0415 - models.loader and models.geometry read model files: imported where used

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.engine.seeding import derive_seed
from spmd_diffusion.errors import InputError
from spmd_diffusion.jobs.options import GenerateOptions
from spmd_diffusion.jobs.prompts import PromptItem
from spmd_diffusion.models.lora import is_local, parse_lora
from spmd_diffusion.request import OmniDiffusionRequest, check_prompt_length, check_seed
from spmd_diffusion.utils.image_inputs import DATA_URI, IMAGE_FIELDS, URL


def item_error(item: PromptItem, exc: ValueError) -> InputError:
    """A request check's failure, said of the item (its file and line)."""
    return InputError(f"{item.where or f'item {item.id!r} (line {item.line})'}: {exc}")


def build_request(
    item: PromptItem,
    options: GenerateOptions,
    run_seed: int,
    config: OmniDiffusionConfig | None = None,
    accepted: list[Any] | None = None,
) -> OmniDiffusionRequest:
    """The item's request: run-wide settings, overridden by the item's own, within the
    config's limits, its seed fixed; input image and LoRA paths resolved against the prompt
    file, and the pipeline checked to take them (``accepted`` caches its call arguments)."""
    settings: dict[str, Any] = {
        "negative_prompt": options.negative_prompt,
        "num_inference_steps": options.steps,
        "guidance_scale": options.guidance,
        "height": options.height,
        "width": options.width,
        "strength": options.strength,
        "num_images_per_prompt": options.images_per_prompt,
        "num_frames": options.num_frames,
        "fps": options.fps,
        "true_cfg_scale": options.true_cfg_scale,
    }
    settings.update(item.settings)
    resolve_input_paths(
        settings, Path(options.prompts_file).parent if options.prompts_file else Path.cwd()
    )
    try:
        if settings.get("seed") is None:
            check_seed(run_seed)
            settings["seed"] = derive_seed(run_seed, item.id)  # one construction, not a replace()
        request = OmniDiffusionRequest(prompt=item.prompt, request_id=item.id, **settings)
        if config is not None:
            config.check_limits(request)
            check_pipeline_takes(request, config, [] if accepted is None else accepted)
            check_sequence_split(request, config)
        return request
    except ValueError as exc:
        raise item_error(item, exc) from None


class RequestBuilder:
    """:func:`build_request` for a stream of items, fast for the common item that has no
    settings of its own: the run-wide settings are resolved and checked against the config
    and the pipeline once; each such item's request is then built from them with its prompt,
    id and seed (and validated by the request itself, as every request is)."""

    def __init__(
        self, options: GenerateOptions, run_seed: int, config: OmniDiffusionConfig | None = None
    ) -> None:
        self.options = options
        self.run_seed = run_seed
        self.config = config
        self.template: dict[str, Any] | None = None
        self.shared: OmniDiffusionRequest | None = None
        self.accepted: list[Any] = []  # the pipeline's call arguments, looked up once

    def _template(self, item: PromptItem) -> dict[str, Any]:
        if self.template is None:  # the run-wide settings, checked once (as this item's)
            self.shared = build_request(
                item, self.options, self.run_seed, self.config, self.accepted
            )
            self.template = dict(vars(self.shared))
        return self.template

    def shape_of(self, item: PromptItem) -> OmniDiffusionRequest:
        """A request with the item's batch shape and image count, checked like the item's own,
        but not necessarily its prompt, id or seed: what the planning pass needs to count
        batches (an item without settings shares one such request: no object per item)."""
        if item.settings:
            return build_request(item, self.options, self.run_seed, self.config, self.accepted)
        self._template(item)
        check_item_prompt(item)
        return self.shared

    def __call__(self, item: PromptItem) -> OmniDiffusionRequest:
        if item.settings:
            return build_request(item, self.options, self.run_seed, self.config, self.accepted)
        fields = self._template(item)
        try:
            return OmniDiffusionRequest(
                **{
                    **fields,
                    "prompt": item.prompt,
                    "request_id": item.id,
                    "seed": derive_seed(self.run_seed, item.id),
                    "extra": {},
                }
            )
        except ValueError as exc:
            raise item_error(item, exc) from None


def check_item_prompt(item: PromptItem) -> None:
    """The prompt-length check of a request, for the items that share the run-wide one."""
    try:
        check_prompt_length("prompt", item.prompt)
    except ValueError as exc:
        raise item_error(item, exc) from None


def resolve_input_paths(settings: dict[str, Any], base: Path) -> None:
    """Input image and LoRA paths of a prompt file are relative to the file: made absolute
    here, so every rank finds them whatever its working directory (URLs are left to be
    refused; a LoRA that is no file beside the prompts stays a hub id)."""
    for name in IMAGE_FIELDS:
        value = settings.get(name)
        if (
            isinstance(value, str)
            and not URL.match(value)
            and not DATA_URI.match(value)
            and value.strip()
        ):
            settings[name] = os.path.abspath(base / Path(value).expanduser())
    loras = settings.get("lora")
    if isinstance(loras, (str, list)):
        resolved = []
        for spec in [loras] if isinstance(loras, str) else loras:
            try:
                parsed = parse_lora(spec)
            except ValueError:
                resolved.append(spec)  # refused, with the file and line, when the request is built
                continue
            local = base / Path(parsed.source).expanduser()
            if not Path(parsed.source).is_absolute() and (
                is_local(parsed.source) or local.exists()
            ):
                spec = f"{os.path.abspath(local)}:{parsed.scale}"
            resolved.append(spec)
        settings["lora"] = resolved


def build_requests(
    items: list[PromptItem],
    options: GenerateOptions,
    run_seed: int,
    config: OmniDiffusionConfig | None = None,
) -> list[OmniDiffusionRequest]:
    """One request per item (see :func:`build_request`)."""
    accepted: list[Any] = []
    return [build_request(item, options, run_seed, config, accepted) for item in items]


def check_pipeline_takes(
    request: OmniDiffusionRequest, config: OmniDiffusionConfig, accepted: list[Any]
) -> None:
    """An item's inputs and the pipeline's call agree: input images only for a pipeline that
    takes them, and always for one that needs them; ``extra`` arguments the call names.
    Known before loading from the class name or model_index.json (a hub id's class is only
    known once loaded). The server runs the same check on every request before queueing it."""
    if not accepted:
        from spmd_diffusion.models.loader import call_arguments

        accepted.append(call_arguments(config.model, config.model_class_name))
    if accepted[0] is None:
        return
    name, arguments = accepted[0]
    missing = [field for field in required_inputs(name) if getattr(request, field) is None]
    if missing:
        raise ValueError(
            f"{name} needs {' and '.join(missing)}: it edits an input image "
            "(a text-to-image pipeline needs none)"
        )
    unknown = sorted(set(request.extra) - arguments)
    if unknown:
        raise ValueError(f"{name} takes no argument {', '.join(map(repr, unknown))} (extra)")
    wanted = [
        name
        for name in (*IMAGE_FIELDS, "strength", "num_frames", "true_cfg_scale")
        if getattr(request, name) is not None
    ]
    refused = [field for field in wanted if field not in arguments]
    if "num_frames" in refused:
        raise ValueError(
            f"{name} takes no num_frames: it makes images; num_frames is for video pipelines "
            "(e.g. --model tiny-video, a WanPipeline)"
        )
    if "true_cfg_scale" in refused:
        raise ValueError(
            f"{name} takes no true_cfg_scale: it guides with guidance_scale (true CFG is for "
            "Qwen-Image and Flux pipelines)"
        )
    if refused:
        raise ValueError(
            f"{name} takes no {', '.join(refused)}: load an image-to-image or inpainting pipeline "
            "(e.g. --model-class-name StableDiffusionImg2ImgPipeline or "
            "StableDiffusionInpaintPipeline)"
        )


def required_inputs(pipeline: str) -> tuple[str, ...]:
    """The inputs a pipeline class cannot run without, by diffusers' naming (its ``__call__``
    defaults them to None and fails inside: "Input is in incorrect format")."""
    if "Inpaint" in pipeline:
        return ("image", "mask_image")
    if any(part in pipeline for part in ("Img2Img", "ImageToImage", "Image2Image")):
        return ("image",)
    return ()


def check_sequence_split(request: OmniDiffusionRequest, config: OmniDiffusionConfig) -> None:
    """Under --ulysses/--ring, an item's image tokens must split evenly over the sequence
    ranks (known before loading from the VAE's and denoiser's configs; a hub id is not)."""
    ranks = config.ulysses_degree * config.ring_degree
    if ranks == 1:
        return
    from spmd_diffusion.models.geometry import default_size, token_grid

    grid = token_grid(config.model)
    default_height, default_width = default_size(config.model)
    height, width = request.height or default_height, request.width or default_width
    if grid is not None and height and width:
        problem = grid.problem(height, width, ranks)
        if problem is not None:
            raise ValueError(problem)
