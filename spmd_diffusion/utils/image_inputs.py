"""Input images of a request (``image``, ``mask_image``): what they may be, checked cheaply.

A request stays small plain data, so an input image is either a local file path (a batch
job's images travel as paths and each worker reads its own batch's files) or the image's
encoded bytes, ``{"format": "png", "data": <base64>}`` (the HTTP API, or a PIL image handed
to the Python API, which is encoded once on construction). URLs are refused: jobs run
offline, and a rank fetching from the network would make a job's pixels depend on it.

Checks read only an image's header (format and size), never its pixels, so rank 0 can check
a whole job's inputs before any model loads; pixels are decoded on the worker that uses them.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL); project modules load where used
# (utils.images): they pull in heavy modules or import back into this one

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

IMAGE_FIELDS = ("image", "mask_image")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)

ImageInput = str | dict[str, Any]


def normalize_image_input(name: str, value: Any) -> ImageInput | None:
    """``value`` as a request holds it: None, a path, or ``{"format", "data"}`` (base64).

    A PIL image is encoded as PNG; a ``data:image/...;base64,`` URI becomes the dict form.
    Raises ValueError naming ``name`` for a URL, an empty string or anything else."""
    if value is None:
        return None
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(value, Image.Image):
        from spmd_diffusion.utils.images import encode_image

        return encode_image(value)
    if isinstance(value, str):
        if DATA_URI.match(value):
            return _checked_encoded(name, {"format": "png", "data": value.split(",", 1)[1]})
        if URL.match(value):
            raise ValueError(
                f"{name} {value!r} is a URL: jobs run offline and fetch nothing; download the "
                "image and give its path (or, over HTTP, its base64 bytes)"
            )
        if not value.strip():
            raise ValueError(f"{name} must be a file path, not an empty string")
        return value
    if isinstance(value, dict):
        return _checked_encoded(name, value)
    raise ValueError(
        f'{name} must be a file path, a PIL image or {{"format": "png", "data": <base64>}}, '
        f"got {type(value).__name__}"
    )


def _checked_encoded(name: str, value: dict[str, Any]) -> dict[str, Any]:
    if set(value) != {"format", "data"} or not isinstance(value.get("data"), str):
        raise ValueError(
            f'{name} as an object must be {{"format": "png", "data": <base64 string>}}'
        )
    try:
        base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: data is not valid base64") from None
    return {"format": str(value["format"]), "data": value["data"]}


def _open(value: ImageInput) -> Any:
    """The image opened lazily (PIL reads the header now, the pixels only on ``load``)."""
    from PIL import Image

    if isinstance(value, dict):
        return Image.open(io.BytesIO(base64.b64decode(value["data"])))
    return Image.open(value)


def image_size(name: str, value: ImageInput) -> tuple[int, int]:
    """``(width, height)`` from the header; ValueError when the file is missing or no image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, str):
        path = Path(value)
        if not path.exists():
            raise ValueError(f"{name} file {value!r} does not exist")
        if not path.is_file():
            raise ValueError(f"{name} {value!r} is not a file")
    try:
        with _open(value) as opened:
            return opened.size
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        what = f"file {value!r}" if isinstance(value, str) else "data"
        reason = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
        raise ValueError(f"{name} {what} is not an image Pillow can read{reason}") from None


def check_image_inputs(request: Any, max_size: int | None = None) -> None:
    """Every input image of ``request`` exists, is an image and, when ``max_size`` is given,
    has no side above it (img2img's output is the input's size)."""
    sizes = {}
    for name in IMAGE_FIELDS:
        value = getattr(request, name, None)
        if value is None:
            continue
        width, height = sizes[name] = image_size(name, value)
        if max_size is not None and max(width, height) > max_size:
            raise ValueError(
                f"{name} is {width}x{height}, above the limit of {max_size} (max_image_size)"
            )
    if (
        len(sizes) == 2 and len(set(sizes.values())) == 2
    ):  # diffusers would resize the mask silently
        (iw, ih), (mw, mh) = sizes["image"], sizes["mask_image"]
        raise ValueError(
            f"mask_image is {mw}x{mh} and image is {iw}x{ih}: an inpainting mask must have its "
            "image's size"
        )


def load_image_input(value: ImageInput, mode: str) -> Any:
    """The decoded PIL image in ``mode`` (RGB for an image, L for a mask): on the worker."""
    with _open(value) as opened:
        return opened.convert(mode)


def image_identity(value: ImageInput | None) -> str | None:
    """What stands for the image's content in a resume fingerprint, without reading the
    pixels: a path with its size and modification time (a replaced file means redo), or
    the hash of encoded bytes."""
    if value is None:
        return None
    if isinstance(value, dict):
        return "sha256:" + hashlib.sha256(value["data"].encode()).hexdigest()
    try:
        stat = os.stat(value)
    except OSError:
        return f"{value}|missing"
    return f"{value}|{stat.st_size}|{stat.st_mtime_ns}"
