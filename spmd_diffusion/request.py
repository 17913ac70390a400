"""One generation request, named with diffusers' own argument names.

A request is plain data: it travels over every RPC channel (pickle, MPI, gloo, HTTP JSON),
so it holds no tensors and validates itself on construction, before any model is loaded.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from spmd_diffusion import option_checks
from spmd_diffusion.utils.image_inputs import normalize_image_input

MAX_SEED = 2**63 - 1
# Pipeline arguments a request sets through its own fields, or the worker sets itself (the
# seeds' generators): ``extra`` may not override them, or the manifest would lie.
RESERVED_EXTRA = frozenset(
    {
        "prompt",
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "num_images_per_prompt",
        "generator",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "image",
        "mask_image",
        "strength",
        "num_frames",
        "num_videos_per_prompt",
        "true_cfg_scale",
    }
)
MAX_FPS = 240
DEFAULT_FPS = 16  # a video file's frame rate when the request gives none (Wan's examples)
# The longest prompt (and negative prompt), in characters, from every entry point: CLI, prompt
# files, datasets, HTTP and the Python API. The widest text encoder the tool runs reads 1024
# tokens (Qwen-Image; T5 reads 512, CLIP 77), about 4-6 K characters of English, so 8192
# leaves room and refuses the accidental megabyte (a file's whole text in one cell). It also
# keeps an image's metadata within what JPEG can carry: both texts as EXIF UTF-16 stay under
# the 64 KB segment (16 K characters each would not).
MAX_PROMPT_CHARS = 8192


# What a pipeline may return that is still an image (latents, tensors, ... are not).
IMAGE_OUTPUT_TYPES = ("pil", "np")


def new_request_id() -> str:
    """A short random id, unique enough for one job's requests."""
    return f"req-{uuid.uuid4().hex[:16]}"


def check_size(name: str, value: int | None) -> None:
    """Height/width must be positive multiples of 8 (the VAE's downsampling factor)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 8 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


def check_prompt_length(name: str, text: str | None) -> None:
    """A prompt of at most :data:`MAX_PROMPT_CHARS` characters, or a ValueError saying so."""
    if text is not None and len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text)} characters; the most is {MAX_PROMPT_CHARS}")


def check_seed(value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer, got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63 - 1], got {value}")


@dataclass
class OmniDiffusionRequest:
    """Everything needed to produce the images of one prompt.

    ``None`` for ``num_inference_steps``, ``guidance_scale``, ``height`` or ``width`` means
    "the pipeline's own default"; the worker reports the values it actually used.
    ``seed=None`` lets the engine derive one from the run seed and ``request_id``, so the
    result never depends on which rank runs the request. ``extra`` holds further keyword
    arguments for the diffusers pipeline call (e.g. ``{"output_type": "np"}``).

    ``image`` and ``mask_image`` (image-to-image and inpainting pipelines) are a file path,
    a PIL image (encoded as PNG here, so the request stays plain data) or
    ``{"format": "png", "data": <base64>}``; ``strength`` is in (0, 1] (None: the
    pipeline's default). The worker passes a pipeline only the arguments its ``__call__``
    takes, and refuses a request whose settings it would have to drop. ``lora`` (a list of
    ``PATH_OR_ID[:scale]``) is the request's own set of LoRA adapters (``[]``: none); None
    means the engine's (``OmniDiffusionConfig.lora``).

    ``true_cfg_scale`` is the "true CFG" scale of the pipelines that guide with one denoiser call
    per branch and a negative prompt (Qwen-Image, Flux), whose ``guidance_scale`` is something
    else (a guidance embedding) or nothing.

    ``num_frames`` (video pipelines; None: the pipeline's default) is the frame count of each
    video, and ``fps`` the frame rate its file is written at (None: 16); a video pipeline's
    "images" are then videos, each a list of frames.
    """

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_images_per_prompt: int = 1
    request_id: str = field(default_factory=new_request_id)
    extra: dict[str, Any] = field(default_factory=dict)
    image: Any = None
    mask_image: Any = None
    strength: float | None = None
    lora: list[str] | None = None
    num_frames: int | None = None
    fps: float | None = None
    true_cfg_scale: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(
                "negative_prompt must be a string or None, "
                f"got {type(self.negative_prompt).__name__}"
            )
        check_prompt_length("prompt", self.prompt)
        check_prompt_length("negative_prompt", self.negative_prompt)
        steps = self.num_inference_steps
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        for name in ("guidance_scale", "true_cfg_scale"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
            setattr(self, name, float(value))
        check_size("height", self.height)
        check_size("width", self.width)
        check_seed(self.seed)
        count = self.num_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {count!r}")
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        reserved = sorted(RESERVED_EXTRA.intersection(self.extra))
        if reserved:
            raise ValueError(
                f"extra may not set {', '.join(reserved)}: use the request's own fields"
            )
        output_type = self.extra.get("output_type", "pil")
        if output_type not in IMAGE_OUTPUT_TYPES:
            raise ValueError(
                f"extra output_type must be one of {', '.join(IMAGE_OUTPUT_TYPES)}, "
                f"got {output_type!r}: the tool returns and writes images"
            )
        self._check_image_inputs()
        self._check_video()
        if self.lora is not None:
            self.lora = [self.lora] if isinstance(self.lora, str) else self.lora
            option_checks.check("lora", self.lora)
            self.lora = list(self.lora)

    def _check_image_inputs(self) -> None:
        self.image = normalize_image_input("image", self.image)
        self.mask_image = normalize_image_input("mask_image", self.mask_image)
        if self.mask_image is not None and self.image is None:
            raise ValueError("mask_image needs an image: inpainting takes both")
        strength = self.strength
        if strength is not None:
            if (
                isinstance(strength, bool)
                or not isinstance(strength, (int, float))
                or not 0 < strength <= 1
            ):
                raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
            self.strength = float(strength)

    def _check_video(self) -> None:
        frames = self.num_frames
        if frames is not None and (
            isinstance(frames, bool) or not isinstance(frames, int) or frames < 1
        ):
            raise ValueError(f"num_frames must be an integer >= 1, got {frames!r}")
        fps = self.fps
        if fps is not None:
            if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= MAX_FPS:
                raise ValueError(f"fps must be a number in (0, {MAX_FPS}], got {fps!r}")
            self.fps = float(fps)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (as long as ``extra`` holds JSON-safe values)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniDiffusionRequest:
        if not isinstance(data, dict):
            raise ValueError(f"a request must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
        if "prompt" not in data:
            raise ValueError("request field 'prompt' is required")
        return cls(**data)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can run in one pipeline call (their prompts may differ)."""
        extra = json.dumps(self.extra, sort_keys=True, default=repr) if self.extra else "{}"
        inputs = (self.image is not None, self.mask_image is not None, self.strength)
        lora = None if self.lora is None else tuple(self.lora)  # one adapter set per pipeline call
        return (
            self.num_inference_steps,
            self.guidance_scale,
            self.height,
            self.width,
            extra,
            inputs,
            lora,
            self.num_frames,
            self.true_cfg_scale,
        )

    def image_seeds(self) -> list[int]:
        """The seed of each of this request's images: ``seed``, ``seed + 1``, ...

        Image k of a request is always seeded the same way, whatever batch it lands in.
        """
        if self.seed is None:
            raise ValueError(f"request {self.request_id} has no seed yet")
        return [(self.seed + k) % (MAX_SEED + 1) for k in range(self.num_images_per_prompt)]
