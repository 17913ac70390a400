"""Writing a batch job's images where they are made.

An :class:`ImageFileSink` travels with a batch to the replica that runs it; the replica's
leader encodes and writes the images into the output directory (atomically) and returns,
in their place, one small record per image: its path, content hash and the rank that wrote
it. Rank 0 receives only those records, so output throughput grows with the number of
replicas instead of stopping at what one process can encode (a 1024x1024 PNG costs a
few hundred milliseconds of CPU).

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
from spmd_diffusion.errors import OutputWriteError
from spmd_diffusion.jobs.encoding import Encoding
from spmd_diffusion.jobs.files import fsync_directory, write_atomic
from spmd_diffusion.jobs.records import ImageRecord

IMAGES_DIR = "images"


def image_name(item_id: str, index: int, count: int, extension: str = "png") -> str:
    """``<id>.png`` for a single image, ``<id>_<k>.png`` when a prompt has several."""
    return f"{item_id}.{extension}" if count == 1 else f"{item_id}_{index}.{extension}"


@dataclass(frozen=True)
class ImageFileSink:
    """Writes the images of one batch into ``output_dir``.

    ``counts`` gives each request's number of images (it names the files); ``skip`` lists the
    ``(id, index)`` images a previous run already finished (a batch is redone whole, but the
    files it already has are not touched again). ``encoding`` says the file formats (images
    and videos); ``described[id]`` (see :func:`~spmd_diffusion.jobs.records.describe`) is written
    into each file's metadata when given.
    """

    output_dir: str
    counts: dict[str, int]
    skip: frozenset[tuple[str, int]] = frozenset()
    encoding: Encoding = Encoding()
    described: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def write(self, output: DiffusionOutput) -> DiffusionOutput:
        """Write every image of ``output``; the same output with images replaced by records
        (``metadata[i]["files"]``) and write failures recorded as that request's error."""
        images: list[list[Any]] = []
        errors = list(output.errors)
        metadata = [dict(meta) for meta in output.metadata]
        for position in range(len(output.request_ids)):
            files = []
            if errors[position] is None:
                try:
                    files = self._write_request(output, position)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: this item fails, not the job
                    errors[position] = f"writing its images failed: {type(exc).__name__}: {exc}"
            metadata[position]["files"] = files
            images.append([])
        self._sync_names(metadata, errors)
        return dataclasses.replace(output, images=images, errors=errors, metadata=metadata)

    def _sync_names(self, metadata: list[dict[str, Any]], errors: list[str | None]) -> None:
        """One directory sync for the whole batch's new names (each file's data was synced as
        it was written), before any record leaves; if it fails, no file of the batch is
        vouched for."""
        directories = {
            (Path(self.output_dir) / record["path"]).parent
            for meta in metadata
            for record in meta["files"]
        }
        try:
            for directory in sorted(directories):
                fsync_directory(directory)
        except OSError as exc:
            reason = f"writing its images failed: {OutputWriteError.from_os_error(directory, exc)}"
            for position, meta in enumerate(metadata):
                if meta["files"]:
                    meta["files"], errors[position] = [], reason

    def _write_request(self, output: DiffusionOutput, position: int) -> list[dict[str, Any]]:
        request_id, images = output.request_ids[position], output.images[position]
        count = self.counts.get(request_id, len(images))
        described = self.described.get(request_id)
        records = []
        for index, image in enumerate(images):
            if (request_id, index) in self.skip:
                continue
            info = (
                ImageRecord.made(request_id, index, described, output, position).info()
                if described is not None
                else None
            )
            extension, data = self.encoding.encode(
                image, info, output.metadata[position].get("fps")
            )
            relative = Path(IMAGES_DIR) / image_name(request_id, index, count, extension)
            write_atomic(
                Path(self.output_dir) / relative, data, sync_directory=False
            )  # synced per batch
            records.append(
                {
                    "index": index,
                    "path": str(relative),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data),
                    "written_by": output.rank,
                }
            )
        return records
