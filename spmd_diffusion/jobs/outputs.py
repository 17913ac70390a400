"""Writing a batch job's images where they are made.

An :class:`ImageFileSink` travels with a batch to the replica that runs it; the replica's
leader encodes and writes the images into the output directory (atomically) and returns,
in their place, one small record per image: its path, content hash and the rank that wrote
it. Rank 0 receives only those records, so output throughput grows with the number of
replicas instead of stopping at what one process can encode (a 1024x1024 PNG costs
140-340 ms of CPU).

The output directory must be on a filesystem every node sees (the usual shared /home,
Lustre or GPFS of a cluster). Where it is not, the images land on each leader's local disk
under the same path, the manifest still lists them, and rank 0's end-of-run check finds the
files it cannot see -- run such jobs on one node, or point --output at shared storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.jobs.files import write_atomic
from spmd_diffusion.utils.images import image_png_bytes

IMAGES_DIR = "images"


def image_name(item_id: str, index: int, count: int) -> str:
    """``<id>.png`` for a single image, ``<id>_<k>.png`` when a prompt has several."""
    return f"{item_id}.png" if count == 1 else f"{item_id}_{index}.png"


@dataclass(frozen=True)
class ImageFileSink:
    """Writes the images of one batch into ``output_dir``.

    ``counts`` gives each request's number of images (it names the files); ``skip`` lists the
    ``(id, index)`` images a previous run already finished (a batch is redone whole, but the
    files it already has are not touched again).
    """

    output_dir: str
    counts: dict[str, int]
    skip: frozenset[tuple[str, int]] = frozenset()

    def write(self, output: DiffusionOutput) -> DiffusionOutput:
        """Write every image of ``output``; the same output with images replaced by records
        (``metadata[i]["files"]``) and write failures recorded as that request's error."""
        images: list[list[Any]] = []
        errors = list(output.errors)
        metadata = [dict(meta) for meta in output.metadata]
        for position, request_id in enumerate(output.request_ids):
            files = []
            if errors[position] is None:
                try:
                    files = self._write_request(request_id, output.images[position], output.rank)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: this item fails, not the job
                    errors[position] = f"writing its images failed: {type(exc).__name__}: {exc}"
            metadata[position]["files"] = files
            images.append([])
        return dataclasses.replace(output, images=images, errors=errors, metadata=metadata)

    def _write_request(self, request_id: str, images: list[Any], rank: int | None) -> list[dict[str, Any]]:
        count = self.counts.get(request_id, len(images))
        records = []
        for index, image in enumerate(images):
            if (request_id, index) in self.skip:
                continue
            relative = Path(IMAGES_DIR) / image_name(request_id, index, count)
            data = image_png_bytes(image)
            write_atomic(Path(self.output_dir) / relative, data)
            records.append({"index": index, "path": str(relative), "sha256": hashlib.sha256(data).hexdigest(),
                            "bytes": len(data), "written_by": rank})
        return records
