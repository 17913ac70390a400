"""Video files of a video pipeline's frames: MP4 (H.264), animated WebP or GIF, each carrying
the item's record (prompt, seed, settings) as the image formats do, the prompt once.

- ``mp4``: H.264 in yuv420p through the ``ffmpeg`` that ``imageio-ffmpeg`` bundles (the
  ``video`` extra; an ``ffmpeg`` binary is not needed on the machine). The record goes in the
  container's ``comment`` tag (without the texts) and the A1111 ``parameters`` text in
  ``description``. Written
  with ffmpeg's bit-exact flags and one encoder thread, so the same frames give the same
  bytes on every rank and machine (the resume check compares hashes).
- ``webp``: animated WebP through Pillow (no extra package), EXIF as for images;
  quality 100 is lossless (frames decode to exactly the pixels made: for datasets and checks).
- ``gif``: animated GIF through Pillow (256 colours; for previews), the record as comment.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (imageio_ffmpeg); project modules load where
# used (jobs.encoding): they pull in heavy modules or import back into this one

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

from spmd_diffusion.request import DEFAULT_FPS

VIDEO_FORMATS = ("mp4", "webp", "gif")
MP4_EXTRA = (
    "--video-format mp4 needs the video extra "
    "(pip install 'spmd-diffusion[video]': imageio-ffmpeg, "
    "which bundles an ffmpeg with libx264); webp and gif need nothing"
)


def mp4_available() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def default_video_format() -> str:
    """MP4 where the encoder is installed, else animated WebP (Pillow only)."""
    return "mp4" if mp4_available() else "webp"


def check_video_format(video_format: str) -> None:
    if video_format not in VIDEO_FORMATS:
        raise ValueError(
            f"video format must be one of {', '.join(VIDEO_FORMATS)}, not {video_format!r}"
        )
    if video_format == "mp4" and not mp4_available():
        raise ValueError(MP4_EXTRA)


def is_video(item: Any) -> bool:
    """A pipeline output item that is a video: a list of frames or a (frames, H, W, C) array."""
    return isinstance(item, (list, tuple)) or (isinstance(item, np.ndarray) and item.ndim == 4)


def frame_arrays(video: Any) -> list[np.ndarray]:
    """uint8 H x W x 3 arrays of a list of PIL frames or float [0, 1] / uint8 arrays."""
    frames = []
    for frame in video:
        if isinstance(frame, Image.Image):
            frames.append(np.asarray(frame.convert("RGB")))
        else:
            array = np.asarray(frame)
            if array.dtype != np.uint8:
                array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
            frames.append(array[..., :3])
    if not frames:
        raise ValueError("a video needs at least one frame")
    return frames


def _frame_ms(fps: float) -> int:
    return max(1, round(1000 / fps))


def encode_video(
    video: Any,
    video_format: str,
    fps: float = DEFAULT_FPS,
    quality: int | None = None,
    info: dict[str, Any] | None = None,
) -> bytes:
    """The file bytes of ``video`` (frames) in ``video_format``, carrying ``info`` when given
    (less what images leave out too: ``encoding.NOT_EMBEDDED``)."""
    from spmd_diffusion.jobs.encoding import DEFAULT_QUALITY, NOT_EMBEDDED, _exif, split_texts

    check_video_format(video_format)
    if info is not None:
        info = {key: value for key, value in info.items() if key not in NOT_EMBEDDED}
    frames = frame_arrays(video)
    quality = quality if quality is not None else DEFAULT_QUALITY["webp"]
    if video_format == "mp4":
        return _encode_mp4(frames, fps, quality, split_texts(info) if info is not None else None)
    pictures = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    options: dict[str, Any] = {
        "save_all": True,
        "append_images": pictures[1:],
        "duration": _frame_ms(fps),
        "loop": 0,
    }
    if video_format == "webp":
        options.update(quality=quality, lossless=quality == 100)
        if info is not None:
            options["exif"] = _exif(*split_texts(info))
        pictures[0].save(buffer, format="WEBP", **options)
    else:
        if info is not None:
            options["comment"] = json.dumps(info, sort_keys=True, default=repr).encode()
        pictures[0].save(buffer, format="GIF", **options)
    return buffer.getvalue()


def _encode_mp4(
    frames: list[np.ndarray], fps: float, quality: int, texts: tuple[str, str] | None
) -> bytes:
    import imageio_ffmpeg

    # imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, Python code run between fork
    # and exec: in a process with other threads (the output writer beside the denoising
    # thread, a server's threads) the child can deadlock on a lock another thread held at the
    # fork, and Popen waits forever (seen here in a server's encoding thread; imageio-ffmpeg's
    # issue 58). This variable is its own switch to start ffmpeg without it.
    os.environ["IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"] = "1"

    height, width = frames[0].shape[:2]
    tags: list[str] = []
    if texts is not None:
        parameters, record_json = texts
        tags = ["-metadata", f"comment={record_json}", "-metadata", f"description={parameters}"]
    with tempfile.TemporaryDirectory(prefix="spmd-video-") as directory:
        path = str(Path(directory) / "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (width, height),
            fps=fps,
            codec="libx264",
            quality=max(1.0, quality / 10),
            macro_block_size=2,  # yuv420p needs even sides; sizes are multiples of 8 anyway
            ffmpeg_log_level="error",
            output_params=[
                *tags,
                "-threads",
                "1",
                "-fflags",
                "+bitexact",
                "-flags:v",
                "+bitexact",
                "-map_metadata",
                "-1",
            ],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        return Path(path).read_bytes()


@contextlib.contextmanager
def _mp4_file(data: bytes) -> Iterator[str]:
    """``data`` as a temporary .mp4 file (ffmpeg reads files), removed afterwards."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(data)
        handle.flush()
        yield handle.name


def read_frames(data: bytes, video_format: str) -> list[Image.Image]:
    """The frames of an encoded video (for the contact sheet and for checks)."""
    if video_format == "mp4":
        import imageio_ffmpeg

        with _mp4_file(data) as path:
            reader = imageio_ffmpeg.read_frames(path)
            meta = next(reader)
            width, height = meta["size"]
            return [Image.frombytes("RGB", (width, height), frame) for frame in reader]
    with Image.open(io.BytesIO(data)) as video:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(video)]


def ffmetadata_tags(text: str) -> dict[str, str]:
    """The tags of ffmpeg's ``ffmetadata`` output: ``key=value`` lines where a backslash
    escapes the next character (``=``, ``;``, ``#``, a backslash or a newline inside a value)."""
    tags: dict[str, str] = {}
    key: str | None = None
    part: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            part.append(next(chars, ""))
        elif char == "=" and key is None:
            key, part = "".join(part), []
        elif char == "\n":
            if key is not None and key[:1] not in (";", "#", "["):
                tags[key] = "".join(part)
            key, part = None, []
        else:
            part.append(char)
    if key is not None:
        tags[key] = "".join(part)
    return tags


def read_video_record(data: bytes, video_format: str) -> dict[str, Any] | None:
    """The JSON record a video file carries (its texts put back from ``parameters``), else None."""
    from spmd_diffusion.jobs.encoding import EXIF_IMAGE_DESCRIPTION, exif_parameters, join_texts

    if video_format == "mp4":
        import imageio_ffmpeg

        with _mp4_file(data) as path:
            done = subprocess.run(
                [
                    imageio_ffmpeg.get_ffmpeg_exe(),
                    "-v",
                    "error",
                    "-i",
                    path,
                    "-f",
                    "ffmetadata",
                    "-",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        tags = ffmetadata_tags(done.stdout)
        return join_texts(tags.get("comment"), tags.get("description"))
    with Image.open(io.BytesIO(data)) as video:
        if video.format == "GIF":
            text = video.info.get("comment")
            return json.loads(text) if text else None
        exif = video.getexif()
        return join_texts(exif.get(EXIF_IMAGE_DESCRIPTION), exif_parameters(exif))


def frame_strip(frames: list[Image.Image], count: int = 4) -> Image.Image:
    """``count`` frames spread over the video, side by side: a video's tile in the contact sheet."""
    picks = [
        frames[round(k * (len(frames) - 1) / max(1, count - 1))]
        for k in range(min(count, len(frames)))
    ]
    width, height = picks[0].size
    strip = Image.new("RGB", (width * len(picks), height), "white")
    for position, frame in enumerate(picks):
        strip.paste(frame.convert("RGB"), (position * width, 0))
    return strip
