"""A quick look at a run: the first images in a grid, each labelled with its id; a video's
tile is a strip of four of its frames, first to last."""

# ruff: noqa: PLC0415 - the video readers (PyAV) are imported only for a video's tile

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path
from typing import IO

from PIL import Image, ImageDraw, ImageFont, ImageSequence

from spmd_diffusion.jobs.files import write_atomic
from spmd_diffusion.jobs.records import ImageRecord

TILE = 128
LABEL = 14


def _picture(source: Path | IO[bytes]) -> Image.Image:
    """The tile's picture: the image, or a frame strip of a video (MP4, animated WebP/GIF)."""
    from spmd_diffusion.jobs.video import frame_strip, read_frames

    name = str(source if isinstance(source, Path) else getattr(source, "name", ""))
    if name.endswith(".mp4"):
        data = source.read_bytes() if isinstance(source, Path) else source.read()
        return frame_strip(read_frames(data, "mp4"))
    with Image.open(source) as image:
        if getattr(image, "n_frames", 1) > 1:
            return frame_strip([frame.convert("RGB") for frame in ImageSequence.Iterator(image)])
        return image.convert("RGB")


def contact_sheet(images: list[tuple[str, Path | IO[bytes]]], columns: int = 4) -> Image.Image:
    """A grid of (label, image path or open file) pairs; every tile is TILE pixels wide, its
    label below."""
    rows = max(1, math.ceil(len(images) / columns))
    columns = min(columns, max(1, len(images)))
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for position, (label, path) in enumerate(images):
        tile = _picture(path)
        scale = TILE / max(tile.size)  # small images are enlarged too, pixel for pixel
        tile = tile.resize(
            (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
            Image.NEAREST if scale > 1 else Image.LANCZOS,
        )
        x, y = (position % columns) * TILE, (position // columns) * (TILE + LABEL)
        sheet.paste(tile, (x + (TILE - tile.width) // 2, y + (TILE - tile.height) // 2))
        draw.text((x + 2, y + TILE + 1), label[:20], fill="black", font=font)
    return sheet


def write_contact_sheet(
    path: Path, images: list[tuple[str, Path | IO[bytes]]], columns: int = 4
) -> None:
    buffer = io.BytesIO()
    contact_sheet(images, columns).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def write_records_sheet(output_dir: Path, records: list[ImageRecord]) -> None:
    """``contact_sheet.png`` of a job's ok images (by id and index, not arrival order), each
    read from its file or its shard."""
    ordered = sorted(records, key=lambda record: (record.id, record.index))
    write_contact_sheet(
        output_dir / "contact_sheet.png",
        [(record.id, _recorded_image(output_dir, record)) for record in ordered],
    )


def _recorded_image(output_dir: Path, record: ImageRecord) -> Path | io.BytesIO:
    """An ok image: its file, or its member of a shard."""
    path = output_dir / record.path
    if record.member is None:
        return path
    with tarfile.open(path) as tar:
        member = tar.extractfile(record.member)
        data = io.BytesIO(member.read() if member is not None else b"")
    data.name = record.member  # the contact sheet reads the format from the name
    return data
