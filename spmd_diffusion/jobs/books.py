"""Rank 0's books of a running job: which images it still awaits, and their records.

A request is registered when its batch is read from the input and dropped when its output
arrives; images in a shard that is still open wait in ``pending`` (at most a shard per
leader) until the shard is complete. Memory is bounded by the work in flight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.jobs.records import ImageRecord, ShardEvent, shard_events
from spmd_diffusion.request import OmniDiffusionRequest

CONTACT_SHEET_IMAGES = 16


@dataclass
class JobStats:
    images_ok: int = 0
    images_failed: int = 0
    images_arrived: int = 0  # records received (ok, failed or pending in an open shard)
    items_failed: set[str] = field(default_factory=set)
    per_rank: Counter = field(default_factory=Counter)
    sheet: list[ImageRecord] = field(default_factory=list)  # the contact sheet's first images
    shards_written: int = 0
    stopped: bool = False

    @property
    def made(self) -> int:
        return self.images_ok + self.images_failed


@dataclass
class InFlight:
    """A request rank 0 has handed out (or is about to): what its records need."""

    request: OmniDiffusionRequest
    described: dict[str, Any]  # see records.describe
    expected: list[int]  # image indices this run must account for


class Books:
    """The records of each batch output as they become final, counted into ``stats``."""

    def __init__(self) -> None:
        self.stats = JobStats()
        self.in_flight: dict[str, InFlight] = {}
        self.pending: dict[str, list[ImageRecord]] = {}  # shard path -> records waiting for it

    def expect(self, request: OmniDiffusionRequest, described: dict[str, Any], done: Any) -> None:
        """``request`` is handed out; its images not in ``done`` (indices) must come back."""
        self.in_flight[request.request_id] = InFlight(
            request,
            described,
            [k for k in range(request.num_images_per_prompt) if k not in done],
        )

    def record(
        self,
        flight: InFlight,
        index: int,
        output: DiffusionOutput,
        position: int,
        files: dict[int, dict[str, Any]],
    ) -> ImageRecord:
        """The record of image ``index`` of a request (ok when its file was written; pending
        when it went into a shard that is not complete yet)."""
        request = flight.request
        settings = output.metadata[position]
        record = ImageRecord.made(request.request_id, index, flight.described, output, position)
        record.status = "error"
        record.error = output.errors[position]
        record.seconds = round(
            settings.get("seconds", 0.0) / max(1, request.num_images_per_prompt), 4
        )
        record.rank = settings.get("rank", output.rank)
        written = files.get(index)
        if record.error is None and written is not None:
            record.wrote(written)
            record.status = "pending" if record.key is not None else "ok"
        else:
            record.error = record.error or "no image returned"
        return record

    def _count(self, records: list[ImageRecord]) -> None:
        """Final records (ok or error) into the totals."""
        for record in records:
            if record.status == "ok":
                self.stats.images_ok += 1
                self.stats.per_rank[record.rank] += 1
                if len(self.stats.sheet) < CONTACT_SHEET_IMAGES:
                    self.stats.sheet.append(record)
            else:
                self.stats.images_failed += 1
                self.stats.items_failed.add(record.id)

    def shard_records(self, events: list[ShardEvent]) -> list[ImageRecord]:
        """Records that are final now: those of shards just completed (ok, with the shard's
        size) or lost (error), counted."""
        records = []
        for event in events:
            if event.closed:
                self.stats.shards_written += 1
            for record in self.pending.pop(event.path, ()):
                if event.closed:
                    record.status, record.shard_bytes = "ok", event.bytes
                else:
                    record.status = "error"
                    record.error = f"its shard could not be written: {event.error}"
                    record.path = None
                records.append(record)
        self._count(records)
        return records

    def records(self, output: DiffusionOutput) -> list[ImageRecord]:
        """The records one batch output makes final, counted."""
        records = []
        for position, request_id in enumerate(output.request_ids):
            flight = self.in_flight.pop(request_id, None)
            if flight is None:
                continue  # not an item of this run, or already accounted for
            files = {entry["index"]: entry for entry in output.metadata[position].get("files", ())}
            for index in flight.expected:
                record = self.record(flight, index, output, position, files)
                self.stats.images_arrived += 1
                if record.status == "pending":
                    self.pending.setdefault(record.path, []).append(record)
                else:
                    records.append(record)
        self._count(records)
        return records + self.shard_records(shard_events(output))

    def missing(self) -> list[tuple[str, int]]:
        """Images handed out that have no final record, sorted."""
        return sorted(
            [
                (request_id, k)
                for request_id, flight in self.in_flight.items()
                for k in flight.expected
            ]
            + [(record.id, record.index) for records in self.pending.values() for record in records]
        )
