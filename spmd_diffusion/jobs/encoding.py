"""Image files that say how they were made: PNG, JPEG or WebP with the prompt, seed and
settings inside, in the places image viewers and tools already read, the prompt once.

- ``parameters``: the AUTOMATIC1111 text most Stable Diffusion tools parse (prompt, negative
  prompt, settings line). PNG: an iTXt chunk (UTF-8); JPEG and WebP: EXIF ``UserComment``
  (UTF-16, EXIF's UNICODE code).
- The image's JSON record (seed, settings, id, model...) without the two texts, which it
  takes from ``parameters`` by their lengths (:func:`read_record` puts them back). PNG: the
  ``spmd_diffusion`` iTXt chunk; JPEG and WebP: EXIF ``ImageDescription``.

The texts were once stored three times (``parameters``, a ``prompt`` chunk or an XMP
description, and the record): a long prompt tripled the file, and a JPEG with 16 K
characters of non-Latin prompt overflowed its 64 KB XMP segment and failed to write.
"""

# ruff: noqa: PLC0415 - project modules load where used (jobs.video): they pull in heavy modules or
# import back into this one

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from spmd_diffusion.request import DEFAULT_FPS

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # file extension -> Pillow format
DEFAULT_QUALITY = {"jpg": 90, "webp": 90}
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
EXIF_UNICODE = b"UNICODE\x00"
RECORD_KEY = "spmd_diffusion"
# Left out of the embedded record: the resume fingerprint covers the output format too, and
# the same image must be the same bytes whether it lands in a file or in a shard.
NOT_EMBEDDED = ("fingerprint",)
TEXTS = ("prompt", "negative_prompt")  # stored in ``parameters`` only
TEXT_LENGTHS = "parameters_text_lengths"  # the record's key for where they are
NEGATIVE_LABEL = "\nNegative prompt: "


def parameters_text(info: dict[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text: prompt, negative prompt, then a settings line."""
    lines = [str(info.get("prompt") or "")]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    settings = [
        ("Steps", info.get("num_inference_steps")),
        ("CFG scale", info.get("guidance_scale")),
        ("Seed", info.get("seed")),
        (
            "Size",
            f"{info['width']}x{info['height']}"
            if info.get("width") and info.get("height")
            else None,
        ),
        ("Model", info.get("model")),
    ]
    lines.append(", ".join(f"{name}: {value}" for name, value in settings if value is not None))
    return "\n".join(lines)


def split_texts(info: dict[str, Any]) -> tuple[str, str]:
    """(``parameters`` text, the record's JSON without the texts but with their lengths)."""
    record = {key: value for key, value in info.items() if key not in TEXTS}
    record[TEXT_LENGTHS] = {key: len(str(info[key])) for key in TEXTS if info.get(key) is not None}
    return parameters_text(info), json.dumps(record, sort_keys=True, default=repr)


def join_texts(record_json: str | None, parameters: str | None) -> dict[str, Any] | None:
    """The full record: the embedded one with its texts taken back out of ``parameters``
    (records written before the texts moved out carry them already)."""
    if not record_json:
        return None
    record = json.loads(record_json)
    lengths = record.pop(TEXT_LENGTHS, None)
    if lengths is None or parameters is None:
        return record
    if "prompt" in lengths:
        record["prompt"] = parameters[: lengths["prompt"]]
    if "negative_prompt" in lengths:  # right after the prompt, behind its label, when not empty
        start = lengths.get("prompt", 0) + len(NEGATIVE_LABEL)
        record["negative_prompt"] = parameters[start : start + lengths["negative_prompt"]]
    return record


def _exif(parameters: str, record_json: str) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = record_json  # ASCII (json's default escapes), as EXIF asks
    exif[EXIF_SOFTWARE] = RECORD_KEY
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = EXIF_UNICODE + parameters.encode("utf-16-be")
    return exif


def exif_parameters(exif: Image.Exif) -> str | None:
    """The ``parameters`` text of an EXIF ``UserComment`` written by :func:`_exif`."""
    comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(EXIF_UNICODE):
        return comment[len(EXIF_UNICODE) :].decode("utf-16-be")
    return comment if isinstance(comment, str) else None


def as_pil(image: Any) -> Image.Image:
    """A PIL image of a PIL image or a float array in [0, 1] (``output_type="np"``)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return image


def encode_image(
    image: Any,
    image_format: str = "png",
    quality: int | None = None,
    info: dict[str, Any] | None = None,
) -> bytes:
    """The file bytes of ``image`` in ``image_format`` (png, jpg, webp), carrying ``info``
    (the image's record: prompt, seed, settings) when given."""
    pil = as_pil(image)
    if info is not None:
        info = {key: value for key, value in info.items() if key not in NOT_EMBEDDED}
    buffer = io.BytesIO()
    if image_format == "png":
        kwargs: dict[str, Any] = {}
        if info is not None:
            parameters, record_json = split_texts(info)
            text = PngInfo()
            text.add_itxt("parameters", parameters)
            text.add_itxt(RECORD_KEY, record_json)
            kwargs["pnginfo"] = text
        pil.save(buffer, format="PNG", **kwargs)
    elif image_format in ("jpg", "webp"):
        kwargs = {"quality": quality if quality is not None else DEFAULT_QUALITY[image_format]}
        if info is not None:
            kwargs["exif"] = _exif(*split_texts(info))
        pil.convert("RGB").save(buffer, format=FORMATS[image_format], **kwargs)
    else:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, not {image_format!r}")
    return buffer.getvalue()


def read_record(data: bytes) -> dict[str, Any] | None:
    """The JSON record an encoded image carries (PNG text chunks or EXIF), else None."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return join_texts(image.info.get(RECORD_KEY), image.info.get("parameters"))
        exif = image.getexif()
        return join_texts(exif.get(EXIF_IMAGE_DESCRIPTION), exif_parameters(exif))


@dataclass(frozen=True)
class Encoding:
    """How a job's outputs become files: ``image_format`` (png, jpg, webp) and ``quality`` for
    images, ``video_format`` (mp4, webp, gif) for a video pipeline's frame lists. Shared by the
    file and shard sinks, so the same item is the same bytes in either."""

    image_format: str = "png"
    quality: int | None = None
    video_format: str = "webp"

    def extension(self, item: Any) -> str:
        from spmd_diffusion.jobs.video import is_video

        return self.video_format if is_video(item) else self.image_format

    def encode(
        self, item: Any, info: dict[str, Any] | None, fps: float | None = None
    ) -> tuple[str, bytes]:
        """(file extension, bytes) of one output item: an image, or a video at ``fps``."""
        from spmd_diffusion.jobs.video import encode_video, is_video

        if is_video(item):
            data = encode_video(item, self.video_format, fps or DEFAULT_FPS, self.quality, info)
        else:
            data = encode_image(item, self.image_format, self.quality, info)
        return self.extension(item), data
