"""JSON-safe encoding of generated images.

PIL images travel as base64 PNG (lossless and compact); float arrays (``output_type="np"``)
travel as base64 raw bytes with dtype and shape, so a round trip is bit-exact either way. A
video pipeline's output item is a video: a list of frames, each encoded as an image.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Any  # PIL.Image.Image or numpy.ndarray


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_png_bytes(image: ImageLike) -> bytes:
    """PNG bytes of a PIL image, or of a float array in [0, 1] (``output_type="np"``)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return png_bytes(image)


def as_frames(video: Any) -> list[Image.Image]:
    """A video as PIL frames: from a (frames, H, W, C) float array in [0, 1] (diffusers' "np"
    output), a list of arrays, or a list of PIL images."""
    frames = []
    for frame in video:
        if isinstance(frame, Image.Image):
            frames.append(frame)
            continue
        array = np.asarray(frame)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        frames.append(Image.fromarray(array[..., :3]))
    return frames


def encode_image(image: ImageLike) -> dict[str, Any]:
    if isinstance(image, (list, tuple)):
        return {"format": "frames", "frames": [encode_image(frame) for frame in image]}
    if isinstance(image, Image.Image):
        return {"format": "png", "data": base64.b64encode(png_bytes(image)).decode("ascii")}
    if isinstance(image, np.ndarray):
        array = np.ascontiguousarray(image)
        return {
            "format": "ndarray",
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode("ascii"),
        }
    raise TypeError(f"cannot encode an image of type {type(image).__name__}")


def decode_image(data: dict[str, Any]) -> ImageLike:
    kind = data.get("format")
    if kind == "frames":
        return [decode_image(frame) for frame in data["frames"]]
    raw = base64.b64decode(data["data"])
    if kind == "png":
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image
    if kind == "ndarray":
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    raise ValueError(f"unknown image format {kind!r}")


def to_float_array(image: ImageLike) -> np.ndarray:
    """Pixels in [0, 1] as float64, for comparing images of either kind."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return np.asarray(image, dtype=np.float64)
