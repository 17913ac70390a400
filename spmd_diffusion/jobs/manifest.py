"""The manifest: one JSON line per image, the source of truth for resume.

A line records everything needed to redo or audit the image: id, prompt, seed, all
generation settings, path, status (ok/error), error text, seconds and rank. An image is
done when its latest line is ok, its settings fingerprint matches the current run and its
file exists; everything else is (re)generated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmd_diffusion.jobs.files import AppendLog
from spmd_diffusion.jobs.outputs import image_name  # noqa: F401 - part of the manifest's vocabulary
from spmd_diffusion.models.lora import lora_identity, parse_loras
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.image_inputs import image_identity

MANIFEST_NAME = "manifest.jsonl"


def fingerprint(request: OmniDiffusionRequest, model: str, settings: dict[str, Any] | None = None) -> str:
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
        **({"inputs": input_basis(request)} if request.image is not None or request.strength is not None else {}),
        **({"lora": [lora_identity(spec) for spec in parse_loras(request.lora)]} if request.lora is not None else {}),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def input_basis(request: OmniDiffusionRequest) -> dict[str, Any]:
    """An image-to-image item's inputs: each file by path, size and modification time (its
    pixels are not read on rank 0), and the strength."""
    return {"image": image_identity(request.image), "mask_image": image_identity(request.mask_image),
            "strength": request.strength}


@dataclass(frozen=True)
class ManifestEntry:
    id: str
    index: int
    status: str
    fingerprint: str
    path: str | None
    bytes: int | None = None

    def file_is_intact(self, output_dir: Path) -> bool:
        """The recorded file is inside ``output_dir`` and whole: its size is the one recorded
        (a truncated or emptied image is redone; older lines without a size need a non-empty
        file)."""
        if not self.path or Path(self.path).is_absolute() or ".." in Path(self.path).parts:
            return False
        try:
            size = (output_dir / self.path).stat().st_size
        except OSError:
            return False
        return size == self.bytes if self.bytes is not None else size > 0


def read_manifest(path: Path) -> dict[tuple[str, int], ManifestEntry]:
    """The latest entry per (id, image index); unparseable (torn) lines are skipped."""
    latest: dict[tuple[str, int], ManifestEntry] = {}
    if not path.exists():
        return latest
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(text)
            entry = ManifestEntry(
                str(record["id"]), int(record["index"]), str(record["status"]),
                str(record.get("fingerprint", "")), record.get("path"),
                int(record["bytes"]) if record.get("bytes") is not None else None,
            )
        except (ValueError, KeyError, TypeError):
            continue
        latest[(entry.id, entry.index)] = entry
    return latest


def done_images(
    output_dir: Path, requests: list[OmniDiffusionRequest], model: str, settings: dict[str, Any] | None = None
) -> set[tuple[str, int]]:
    """Images of ``requests`` that a previous run finished (ok, same settings, file intact)."""
    latest = read_manifest(output_dir / MANIFEST_NAME)
    done = set()
    for request in requests:
        expected = fingerprint(request, model, settings)
        for index in range(request.num_images_per_prompt):
            entry = latest.get((request.request_id, index))
            if (
                entry is not None
                and entry.status == "ok"
                and entry.fingerprint == expected
                and entry.file_is_intact(output_dir)
            ):
                done.add((request.request_id, index))
    return done


class ManifestWriter:
    """Appends the lines of each finished batch in one write."""

    def __init__(self, output_dir: Path, fresh: bool) -> None:
        self.log = AppendLog(output_dir / MANIFEST_NAME, truncate=fresh)

    def append(self, records: list[dict[str, Any]]) -> None:
        if records:
            self.log.write("".join(json.dumps(record, default=repr, allow_nan=False) + "\n" for record in records))

    def close(self) -> None:
        self.log.close()
