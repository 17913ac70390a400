"""Image files that say how they were made: PNG, JPEG or WebP with the prompt, seed and
settings inside, in the places image viewers and tools already read.

- PNG: text chunks (iTXt, UTF-8): ``parameters`` in the AUTOMATIC1111 layout that most
  Stable Diffusion tools parse, ``prompt``, and ``spmd_diffusion`` holding the image's JSON record.
- JPEG and WebP: EXIF ``ImageDescription`` (the JSON record, ASCII-escaped as EXIF asks),
  EXIF ``UserComment`` (``parameters``, UTF-16 as EXIF's UNICODE code), and an XMP packet
  with ``dc:description`` (the prompt) and the record.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # file extension -> Pillow format
DEFAULT_QUALITY = {"jpg": 90, "webp": 90}
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
RECORD_KEY = "spmd_diffusion"
# Left out of the embedded record: the resume fingerprint covers the output format too, and
# the same image must be the same bytes whether it lands in a file or in a shard.
NOT_EMBEDDED = ("fingerprint",)


def parameters_text(info: dict[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text: prompt, negative prompt, then a settings line."""
    lines = [str(info.get("prompt") or "")]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    settings = [("Steps", info.get("num_inference_steps")), ("CFG scale", info.get("guidance_scale")),
                ("Seed", info.get("seed")),
                ("Size", f"{info['width']}x{info['height']}" if info.get("width") and info.get("height") else None),
                ("Model", info.get("model"))]
    lines.append(", ".join(f"{name}: {value}" for name, value in settings if value is not None))
    return "\n".join(lines)


def _xmp(info: dict[str, Any]) -> bytes:
    record = escape(json.dumps(info, sort_keys=True, default=repr), {'"': "&quot;"})
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'xmlns:sd="urn:spmd-diffusion:1.0" sd:record="{record}">'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(str(info.get("prompt") or ""))}'
        '</rdf:li></rdf:Alt></dc:description></rdf:Description></rdf:RDF></x:xmpmeta>'
        '<?xpacket end="w"?>'
    ).encode("utf-8")


def _exif(info: dict[str, Any]) -> Image.Exif:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(info, sort_keys=True, default=repr)  # ensure_ascii: EXIF is ASCII
    exif[EXIF_SOFTWARE] = RECORD_KEY
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\x00" + parameters_text(info).encode("utf-16-be")
    return exif


def as_pil(image: Any) -> Image.Image:
    """A PIL image of a PIL image or a float array in [0, 1] (``output_type="np"``)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return image


def encode_image(image: Any, image_format: str = "png", quality: int | None = None,
                 info: dict[str, Any] | None = None) -> bytes:
    """The file bytes of ``image`` in ``image_format`` (png, jpg, webp), carrying ``info``
    (the image's record: prompt, seed, settings) when given."""
    pil = as_pil(image)
    if info is not None:
        info = {key: value for key, value in info.items() if key not in NOT_EMBEDDED}
    buffer = io.BytesIO()
    if image_format == "png":
        kwargs: dict[str, Any] = {}
        if info is not None:
            text = PngInfo()
            text.add_itxt("parameters", parameters_text(info))
            text.add_itxt("prompt", str(info.get("prompt") or ""))
            text.add_itxt(RECORD_KEY, json.dumps(info, sort_keys=True, default=repr))
            kwargs["pnginfo"] = text
        pil.save(buffer, format="PNG", **kwargs)
    elif image_format in ("jpg", "webp"):
        kwargs = {"quality": quality if quality is not None else DEFAULT_QUALITY[image_format]}
        if info is not None:
            kwargs.update(exif=_exif(info), xmp=_xmp(info))
        pil.convert("RGB").save(buffer, format=FORMATS[image_format], **kwargs)
    else:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, not {image_format!r}")
    return buffer.getvalue()


def read_record(data: bytes) -> dict[str, Any] | None:
    """The JSON record an encoded image carries (PNG text chunk or EXIF), else None."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(RECORD_KEY) if image.format == "PNG" else image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    return json.loads(text) if text else None


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

    def encode(self, item: Any, info: dict[str, Any] | None, fps: float | None = None) -> tuple[str, bytes]:
        """(file extension, bytes) of one output item: an image, or a video at ``fps``."""
        from spmd_diffusion.jobs.video import DEFAULT_FPS, encode_video, is_video

        if is_video(item):
            data = encode_video(item, self.video_format, fps or DEFAULT_FPS, self.quality, info)
        else:
            data = encode_image(item, self.image_format, self.quality, info)
        return self.extension(item), data
