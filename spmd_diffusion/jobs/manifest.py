"""The manifest: one JSON line per image, the source of truth for resume.

A line records everything needed to redo or audit the image: id, prompt, seed, all
generation settings, path, status (ok/error), error text, seconds and rank. An image is
done when its latest line is ok, its settings fingerprint matches the current run and its
file exists; everything else is (re)generated. An image in a WebDataset shard has the
shard as its ``path``, its sample ``key`` and ``member`` name, and the shard's size
(``shard_bytes``): the manifest is the shards' index.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from spmd_diffusion.jobs.files import AppendLog
from spmd_diffusion.jobs.outputs import image_name  # noqa: F401 - part of the manifest's vocabulary
from spmd_diffusion.jobs.records import ImageRecord
from spmd_diffusion.models.lora import lora_identity, parse_loras
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.image_inputs import image_identity

MANIFEST_NAME = "manifest.jsonl"


def fingerprint(
    request: OmniDiffusionRequest, model: str, settings: dict[str, Any] | None = None
) -> str:
    """What determines an item's pixels (besides the software): a changed setting means redo.
    ``settings`` holds the run-wide ones (dtype, pipeline class, batch invariance, images per
    batch: batch composition changes the last bits)."""
    basis = {
        "model": model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "steps": request.num_inference_steps,
        "guidance": request.guidance_scale,
        "height": request.height,
        "width": request.width,
        "images": request.num_images_per_prompt,
        "extra": request.extra,
        **({"run": settings} if settings else {}),
        **(
            {"inputs": input_basis(request)}
            if request.image is not None or request.strength is not None
            else {}
        ),
        **(
            {"lora": [lora_identity(spec) for spec in parse_loras(request.lora)]}
            if request.lora is not None
            else {}
        ),
        **(
            {"video": {"frames": request.num_frames, "fps": request.fps}}
            if request.num_frames is not None or request.fps is not None
            else {}
        ),
        **({"true_cfg": request.true_cfg_scale} if request.true_cfg_scale is not None else {}),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def input_basis(request: OmniDiffusionRequest) -> dict[str, Any]:
    """An image-to-image item's inputs: each file by path, size and modification time (its
    pixels are not read on rank 0), and the strength."""
    return {
        "image": image_identity(request.image),
        "mask_image": image_identity(request.mask_image),
        "strength": request.strength,
    }


def file_is_intact(
    record: ImageRecord, output_dir: Path, sizes: dict[str, int | None] | None = None
) -> bool:
    """The recorded file (or shard) is inside ``output_dir`` and whole: its size is the one
    recorded (a truncated or emptied image or shard is redone; older lines without a size
    need a non-empty file). ``sizes`` caches file sizes by path (a shard holds many images)."""
    path = record.path
    if not path or Path(path).is_absolute() or ".." in Path(path).parts:
        return False
    if sizes is not None and path in sizes:
        size = sizes[path]
    else:
        try:
            size = (output_dir / path).stat().st_size
        except OSError:
            size = None
        if sizes is not None:
            sizes[path] = size
    if size is None:
        return False
    expected = record.shard_bytes if record.shard_bytes is not None else record.bytes
    return size == expected if expected is not None else size > 0


def read_manifest(path: Path) -> dict[tuple[str, int], ImageRecord]:
    """The latest record per (id, image index), brief (what a resume reads); unparseable
    (torn) lines are skipped."""
    latest: dict[tuple[str, int], ImageRecord] = {}
    if not path.exists():
        return latest
    with open(path, encoding="utf-8", errors="replace") as lines:
        for text in lines:
            record = _read_line(text)
            if record is not None:
                latest[(record.id, record.index)] = record
    return latest


def _read_line(text: str) -> ImageRecord | None:
    """One manifest line's record, brief; None for a torn or foreign line."""
    try:
        return ImageRecord.from_json(json.loads(text), brief=True)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def shards_listed(path: Path) -> set[str]:
    """The shard paths the ok lines of the manifest at ``path`` name (read a line at a time)."""
    listed: set[str] = set()
    if not path.exists():
        return listed
    with open(path, encoding="utf-8", errors="replace") as lines:
        for text in lines:
            if '"shard_bytes"' not in text:
                continue
            record = _read_line(text)
            if record is not None and record.status == "ok" and isinstance(record.path, str):
                listed.add(record.path)
    return listed


def is_done(
    entry: ImageRecord | None,
    expected: str,
    output_dir: Path,
    sizes: dict[str, int | None] | None = None,
) -> bool:
    """An image is done: its latest line is ok, with this run's fingerprint, its file intact."""
    return (
        entry is not None
        and entry.status == "ok"
        and entry.fingerprint == expected
        and file_is_intact(entry, output_dir, sizes)
    )


def done_images(
    output_dir: Path,
    requests: list[OmniDiffusionRequest],
    model: str,
    settings: dict[str, Any] | None = None,
) -> set[tuple[str, int]]:
    """Images of ``requests`` that a previous run finished (ok, same settings, file intact)."""
    latest = read_manifest(output_dir / MANIFEST_NAME)
    done = set()
    sizes: dict[str, int | None] = {}
    for request in requests:
        expected = fingerprint(request, model, settings)
        for index in range(request.num_images_per_prompt):
            if is_done(latest.get((request.request_id, index)), expected, output_dir, sizes):
                done.add((request.request_id, index))
    return done


class ManifestWriter:
    """Appends the lines of each finished batch (``ImageRecord.to_json()``) in one write."""

    def __init__(self, output_dir: Path, fresh: bool) -> None:
        self.log = AppendLog(output_dir / MANIFEST_NAME, truncate=fresh)

    def append(self, records: list[dict[str, Any]]) -> None:
        if records:
            self.log.write(
                "".join(
                    json.dumps(record, default=repr, allow_nan=False) + "\n" for record in records
                )
            )

    def close(self) -> None:
        self.log.close()
