"""WebDataset output: each replica leader writes its images into tar shards of its own.

Millions of small files hurt every cluster filesystem; training pipelines read tar shards
(``{key}.png`` + ``{key}.json`` per sample, the layout of the ``webdataset`` library,
img2dataset and Ray Data). A :class:`ShardSink` travels with each batch like the file sink
does; on the leader it appends the batch's images to that leader's open shard, a
``.tar.part`` file, and when the shard holds ``shard_size`` images it is flushed, synced and
renamed to its final ``.tar`` name -- a reader never sees a half-written shard under a final
name.

Rank 0 hears of each image as it is written (``pending`` in the shard it went into) and of
each shard when it is complete; only then do the shard's images get their ok lines in the
manifest (with the shard's size, so a resume can check it). A job killed mid-shard leaves a
``.part`` file whose images have no ok line: the next run deletes it and makes those images
again, into new shards; a shard is never appended to. Shard names carry the run attempt,
the leader's rank and a sequence number (``a0002-r0001-000007.tar``), so no attempt
overwrites another's shards. At the end rank 0 asks every leader to close its last, partial
shard (:func:`close_open_shards`).
"""

# ruff: noqa: PLC0415 - webdataset is optional: imported when a shard is opened

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.jobs.encoding import Encoding
from spmd_diffusion.jobs.files import FILE_MODE, fsync_directory
from spmd_diffusion.jobs.outputs import image_name
from spmd_diffusion.jobs.records import ImageRecord, ShardEvent, events_to_json, with_shard_events

SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"^a(\d{4,})-r(\d{4,}|x)-(\d{6,})\.tar$")


def shard_key(request_id: str, index: int, count: int) -> str:
    """A sample's key: the image's file name without extension; a '.' (WebDataset splits
    key from extension at the first dot) is written %2E (ids never hold '%')."""
    return image_name(request_id, index, count, "x")[:-2].replace(".", "%2E")


class ShardWriter:
    """One leader's shards in one output directory: the open one, and what happened to the
    others since rank 0 was last told (``take_events``)."""

    def __init__(self, output_dir: str, prefix: str, shard_size: int) -> None:
        self.directory = Path(output_dir) / SHARDS_DIR
        self.prefix = prefix
        self.shard_size = shard_size
        self.sequence = 0
        self.tar: Any = None
        self.stream: Any = None
        self.name = ""
        self.images = 0
        self.events: list[ShardEvent] = []

    @property
    def relative(self) -> str:
        return f"{SHARDS_DIR}/{self.name}"

    def _open(self) -> None:
        import webdataset

        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = f"{self.prefix}-{self.sequence:06d}.tar"
        self.sequence += 1
        self.stream = open(self.directory / (self.name + ".part"), "wb")  # noqa: SIM115 - closed in close/abort
        os.fchmod(self.stream.fileno(), FILE_MODE)
        self.tar = webdataset.TarWriter(self.stream, encoder=False)
        self.images = 0

    def add(self, key: str, extension: str, data: bytes, info: dict[str, Any]) -> dict[str, Any]:
        """Append one sample; its record (pending until the shard closes)."""
        if self.tar is None:
            self._open()
        sample = {"__key__": key, extension: data, "json": json.dumps(info, default=repr).encode()}
        self.tar.write(sample)
        self.images += 1
        record = {
            "index": info["index"],
            "path": self.relative,
            "key": key,
            "member": f"{key}.{extension}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        if self.images >= self.shard_size:
            self.close()
        return record

    def close(self) -> None:
        """Finish the open shard: flush, sync, rename to its final name, sync the directory."""
        if self.tar is None:
            return
        self.tar.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        final = self.directory / self.name
        os.replace(self.directory / (self.name + ".part"), final)
        fsync_directory(self.directory)
        self.events.append(
            ShardEvent(self.relative, bytes=final.stat().st_size, images=self.images)
        )
        self.tar = self.stream = None

    def abort(self, error: str) -> None:
        """Drop the open shard (a write failed): its images are lost and rank 0 is told."""
        if self.tar is None:
            return
        try:
            self.stream.close()
        finally:
            (self.directory / (self.name + ".part")).unlink(missing_ok=True)
            self.events.append(ShardEvent(self.relative, error=error))
            self.tar = self.stream = None

    def take_events(self) -> list[ShardEvent]:
        events, self.events = self.events, []
        return events


_WRITERS: dict[tuple[str, int, int | None], ShardWriter] = {}
_LOCK = threading.Lock()


def _writer(output_dir: str, attempt: int, rank: int | None, shard_size: int) -> ShardWriter:
    key = (output_dir, attempt, rank)
    if key not in _WRITERS:
        prefix = f"a{attempt:04d}-r{rank:04d}" if rank is not None else f"a{attempt:04d}-rx"
        _WRITERS[key] = ShardWriter(output_dir, prefix, shard_size)
    return _WRITERS[key]


def close_open_shards(
    _worker: Any, output_dir: str, attempt: int
) -> dict[str, list[dict[str, Any]]]:
    """Close every open shard this process writes for ``output_dir`` / ``attempt`` and
    return what rank 0 has not heard yet, in the wire form of
    :func:`~spmd_diffusion.jobs.records.events_to_json` (called on every rank at the end of
    a job)."""
    events: list[ShardEvent] = []
    with _LOCK:
        for key in [key for key in _WRITERS if key[:2] == (output_dir, attempt)]:
            writer = _WRITERS.pop(key)
            try:
                writer.close()
            except OSError as exc:
                writer.abort(f"closing the shard failed: {exc}")
            events.extend(writer.take_events())
    return events_to_json(events)


@dataclass(frozen=True)
class ShardSink:
    """Writes the images of one batch into this leader's WebDataset shards (see the module
    docstring); ``counts``, ``skip``, ``encoding`` and ``described`` as for
    :class:`~spmd_diffusion.jobs.outputs.ImageFileSink`."""

    output_dir: str
    attempt: int
    shard_size: int
    counts: dict[str, int]
    skip: frozenset[tuple[str, int]] = frozenset()
    encoding: Encoding = Encoding()
    described: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def write(self, output: DiffusionOutput) -> DiffusionOutput:
        """Append every image of ``output`` to the open shard; the output with images
        replaced by records (``metadata[i]["files"]``, pending) and the shard events of this
        leader in its ``notes["shards"]``."""
        errors = list(output.errors)
        metadata = [dict(meta) for meta in output.metadata]
        with _LOCK:
            writer = _writer(self.output_dir, self.attempt, output.rank, self.shard_size)
            for position in range(len(output.request_ids)):
                files: list[dict[str, Any]] = []
                if errors[position] is None:
                    try:
                        files = self._write_request(writer, output, position)
                    except Exception as exc:  # noqa: BLE001 - e.g. a full disk: the shard is lost, not the job
                        writer.abort(f"{type(exc).__name__}: {exc}")
                        errors[position] = f"writing its shard failed: {type(exc).__name__}: {exc}"
                        files = []
                metadata[position]["files"] = files
            events = writer.take_events()
        written = dataclasses.replace(
            output, images=[[] for _ in output.request_ids], errors=errors, metadata=metadata
        )
        return with_shard_events(written, events)

    def _write_request(
        self, writer: ShardWriter, output: DiffusionOutput, position: int
    ) -> list[dict[str, Any]]:
        request_id, images = output.request_ids[position], output.images[position]
        count = self.counts.get(request_id, len(images))
        described = self.described.get(request_id, {})
        records = []
        for index, image in enumerate(images):
            if (request_id, index) in self.skip:
                continue
            info = ImageRecord.made(request_id, index, described, output, position).info()
            extension, data = self.encoding.encode(
                image, info, output.metadata[position].get("fps")
            )
            record = writer.add(shard_key(request_id, index, count), extension, data, info)
            records.append({**record, "written_by": output.rank})
        return records


def shard_files(output_dir: Path) -> list[Path]:
    """Every final shard in ``output_dir`` (not the .part files)."""
    directory = output_dir / SHARDS_DIR
    return (
        sorted(path for path in directory.glob("*.tar") if SHARD_NAME.match(path.name))
        if directory.is_dir()
        else []
    )


def next_attempt(output_dir: Path) -> int:
    """One more than any attempt whose shards (final or partial) are in ``output_dir``."""
    directory = output_dir / SHARDS_DIR
    attempts = [
        int(match.group(1))
        for path in (directory.iterdir() if directory.is_dir() else ())
        if (match := SHARD_NAME.match(path.name.removesuffix(".part")))
    ]
    return max(attempts, default=-1) + 1


def remove_unlisted_shards(output_dir: Path, listed: set[str]) -> int:
    """Delete partial shards, and final ones no ok manifest line names (a job killed after
    closing a shard but before its lines were written; a --no-resume start): their images are
    made again. Returns how many were removed."""
    directory = output_dir / SHARDS_DIR
    removed = 0
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        relative = f"{SHARDS_DIR}/{path.name}"
        if SHARD_NAME.match(path.name.removesuffix(".part")) and (
            path.name.endswith(".part") or relative not in listed
        ):
            path.unlink()
            removed += 1
    return removed
