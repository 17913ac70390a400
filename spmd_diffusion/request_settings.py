"""The per-item settings of a request, declared once for every surface that sets them.

A setting reaches :class:`~spmd_diffusion.request.OmniDiffusionRequest` from four places:
a prompt file's key (JSONL, CSV, parquet and dataset columns), a ``generate`` flag (the
run-wide value for items without their own; the ``--config`` file key is the flag's name),
an HTTP field (the OpenAI route's extensions, named as diffusers names them), and the Python
request itself. Each used to declare its own names, types and bounds, and they drifted (a
bound checked on one surface only, a column type refused in parquet but read in JSONL). This
table is the one declaration: the ``generate`` flags and their config-file keys (through
the run-wide option table, ``entrypoints/options.py``), the HTTP fields
(``entrypoints/http/state.py``), the prompt-file keys and cell conversions
(``jobs/prompts.py``, ``jobs/sources/tables.py``) are generated from it. The request still
validates every value (the last word, whatever the surface).

No framework is imported here: the surfaces turn a :class:`Setting` into their own types.
"""

from __future__ import annotations

from dataclasses import dataclass

from spmd_diffusion.request import MAX_FPS, MAX_PROMPT_CHARS


@dataclass(frozen=True)
class Setting:
    """One request field and how each surface names and bounds it.

    ``kind``: ``int``, ``float``, ``text`` (a string) or ``path`` (a file path or image,
    relative to the prompt file; never a number). ``minimum``/``maximum`` bound numbers
    (``open_minimum``: the minimum itself is refused). ``flag``: the ``generate`` option
    (None: no run-wide flag); ``http``: the OpenAI route's field (None: not on that route).
    """

    field: str
    key: str
    kind: str
    help: str
    flag: str | None = None
    http: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    max_length: int | None = None

    @property
    def number(self) -> bool:
        return self.kind in ("int", "float")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "negative_prompt",
        "negative_prompt",
        "text",
        "Negative prompt for items without their own.",
        flag="--negative-prompt",
        http="negative_prompt",
        max_length=MAX_PROMPT_CHARS,
    ),
    Setting(
        "seed",
        "seed",
        "int",
        "The item's seed (default: derived from the run seed and the item's id).",
        http="seed",
        minimum=0,
        maximum=2**63 - 1,
    ),
    Setting(
        "num_inference_steps",
        "steps",
        "int",
        "Denoising steps (default: the pipeline's).",
        flag="--steps",
        http="num_inference_steps",
        minimum=1,
    ),
    Setting(
        "guidance_scale",
        "guidance",
        "float",
        "Guidance scale (default: the pipeline's).",
        flag="--guidance",
        http="guidance_scale",
        minimum=0,
    ),
    Setting(
        "true_cfg_scale",
        "true_cfg_scale",
        "float",
        "True classifier-free guidance scale of Qwen-Image and Flux pipelines, applied with a "
        "negative prompt (default: the pipeline's).",
        flag="--true-cfg-scale",
        http="true_cfg_scale",
        minimum=0,
    ),
    Setting(
        "height",
        "height",
        "int",
        "Image height, a multiple of 8 (default: the model's).",
        flag="--height",
    ),
    Setting(
        "width",
        "width",
        "int",
        "Image width, a multiple of 8 (default: the model's).",
        flag="--width",
    ),
    Setting("image", "image", "path", "Input image of an image-to-image or inpainting item."),
    Setting("mask_image", "mask_image", "path", "Inpainting mask, the size of the image."),
    Setting(
        "strength",
        "strength",
        "float",
        "Image-to-image/inpainting strength in (0, 1] for items without their own (their 'image'/"
        "'mask_image' columns: paths relative to the prompt file).",
        flag="--strength",
        http="strength",
        minimum=0,
        maximum=1,
        open_minimum=True,
    ),
    Setting(
        "lora", "lora", "path", "The item's LoRA adapters (PATH_OR_ID[:scale], one or a list)."
    ),
    Setting(
        "num_frames",
        "num_frames",
        "int",
        "Video pipelines: frames per video (default: the model's; Wan takes 4k+1).",
        flag="--num-frames",
        http="num_frames",
        minimum=1,
    ),
    Setting(
        "fps",
        "fps",
        "float",
        "Video pipelines: frame rate of the video files (default 16).",
        flag="--fps",
        http="fps",
        minimum=0,
        maximum=MAX_FPS,
        open_minimum=True,
    ),
)

BY_KEY = {setting.key: setting for setting in SETTINGS}
# Prompt-file key -> request field (the file keys also name parquet/dataset columns).
FILE_KEYS = {setting.key: setting.field for setting in SETTINGS}
FLAG_SETTINGS = tuple(setting for setting in SETTINGS if setting.flag)
HTTP_SETTINGS = tuple(setting for setting in SETTINGS if setting.http)
