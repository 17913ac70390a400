"""A batch job's run on rank 0: hands the plan's batches to the engine with the sinks that
write their images on the replicas, and keeps the books as their records arrive: the manifest,
the progress bar, and at the end ``run.json``, a contact sheet, a summary, and the check that
every planned image has a record -- a batch that went missing makes the run incomplete
(exit 3), never a success.
"""

# ruff: noqa: PLC0415 - tqdm (the progress bar) is imported where used

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Iterator
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.errors import OutputWriteError
from spmd_diffusion.exit_codes import EXIT_OK, EXIT_PARTIAL
from spmd_diffusion.jobs.books import Books
from spmd_diffusion.jobs.contact_sheet import write_records_sheet
from spmd_diffusion.jobs.files import write_atomic
from spmd_diffusion.jobs.history import RunHistory
from spmd_diffusion.jobs.manifest import MANIFEST_NAME, ManifestWriter, fingerprint, shards_listed
from spmd_diffusion.jobs.outputs import ImageFileSink
from spmd_diffusion.jobs.plan import GeneratePlan, run_settings
from spmd_diffusion.jobs.prompts import PromptItem
from spmd_diffusion.jobs.records import describe, events_from_json
from spmd_diffusion.jobs.shards import ShardSink, close_open_shards, remove_unlisted_shards
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

SHARDS_INDEX = "shards.txt"


class GenerateJob:
    """Runs a plan: each batch's records arrive (the replica leaders wrote the images), rank 0
    appends them to the manifest (:class:`Books`) and the run's record (:class:`RunHistory`);
    :meth:`run` returns the exit code."""

    def __init__(self, plan: GeneratePlan, layout: dict[str, Any]) -> None:
        self.plan = plan
        self.layout = layout
        self.books = Books()
        self.history = RunHistory(plan, layout, self.books.stats)
        self.settings = run_settings(plan.options, plan.config)
        self.done_by_id: dict[str, set[int]] = {}
        for request_id, index in plan.done:
            self.done_by_id.setdefault(request_id, set()).add(index)

    def describe(self, item: PromptItem, request: OmniDiffusionRequest) -> dict[str, Any]:
        """What each of the request's image records says about it (see :func:`describe`)."""
        model = self.plan.config.model
        return describe(request, model, fingerprint(request, model, self.settings), item.meta)

    def batches(self) -> Iterator[list[OmniDiffusionRequest]]:
        """The plan's batches, read lazily; each request is registered as in flight."""
        for chunk in self.plan.batches():
            for item, request in chunk:
                self.books.expect(
                    request,
                    self.describe(item, request),
                    self.done_by_id.get(request.request_id, ()),
                )
            yield [request for _, request in chunk]

    def sink(self, batch: list[OmniDiffusionRequest]) -> ImageFileSink | ShardSink:
        """Where the replica running ``batch`` writes its images (skipping those already done)."""
        options = self.plan.options
        skip = frozenset(
            (r.request_id, k) for r in batch for k in self.done_by_id.get(r.request_id, ())
        )
        counts = {r.request_id: r.num_images_per_prompt for r in batch}
        in_flight = self.books.in_flight
        described = {
            r.request_id: in_flight[r.request_id].described
            for r in batch
            if r.request_id in in_flight
        }
        if self.plan.shards:
            return ShardSink(
                str(self.plan.output_dir),
                self.plan.attempt,
                options.shard_size,
                counts,
                skip,
                options.encoding,
                described,
            )
        return ImageFileSink(str(self.plan.output_dir), counts, skip, options.encoding, described)

    def _close_shards(self, engine: Any, writer: ManifestWriter) -> None:
        """Every leader closes its last shard; their images get their lines."""
        output_dir, attempt = str(self.plan.output_dir), self.plan.attempt
        results = engine.collective_rpc(close_open_shards, args=(output_dir, attempt))
        results.append(close_open_shards(None, output_dir, attempt))  # sinks that ran here
        for events in results:
            records = self.books.shard_records(events_from_json(events))
            writer.append([record.to_json() for record in records])

    def _prepare_shards(self) -> None:
        """Before writing: delete partial shards and those no ok manifest line lists (their
        images are not done, so they are made again into new shards)."""
        listed = (
            shards_listed(self.plan.output_dir / MANIFEST_NAME)
            if self.plan.options.resume
            else set()
        )
        removed = remove_unlisted_shards(self.plan.output_dir, listed)
        if removed:
            logger.info(
                "removed %d partial or unlisted shard(s); their images are made again", removed
            )

    def _write_shard_index(self) -> None:
        """``shards.txt``: every complete shard the manifest lists, one path a line (what
        ``webdataset.WebDataset`` takes)."""
        listed = sorted(
            path
            for path in shards_listed(self.plan.output_dir / MANIFEST_NAME)
            if (self.plan.output_dir / path).is_file()
        )
        write_atomic(
            self.plan.output_dir / SHARDS_INDEX, "".join(f"{path}\n" for path in listed).encode()
        )

    def run(self, engine: Any) -> int:
        from tqdm import tqdm

        plan, books, history = self.plan, self.books, self.history
        stats = books.stats
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        history.begin()
        if plan.shards:
            self._prepare_shards()
        writer = ManifestWriter(plan.output_dir, fresh=not plan.options.resume)
        if plan.done:
            logger.info("resuming: %d of %d images already done", len(plan.done), plan.images_total)
        bar = tqdm(
            total=plan.images_to_make,
            unit="img",
            desc="generate",
            dynamic_ncols=True,
            file=sys.stderr,
        )

        def on_output(output: DiffusionOutput) -> bool:
            before = stats.images_arrived
            writer.append([record.to_json() for record in books.records(output)])
            bar.update(stats.images_arrived - before)
            history.first_output_arrived()
            if plan.options.fail_fast and stats.images_failed:
                stats.stopped = True
                return False
            return True

        try:
            batches = self._warm_up(engine, self.batches())
            engine.generate_stream(batches, on_output, sinks=self.sink)
            if plan.shards:
                self._close_shards(engine, writer)
        except KeyboardInterrupt:
            history.write("interrupted", history.seconds)
            raise
        except Exception as exc:  # a fault that ends the job (a worker died, a timeout): say so
            history.write("failed", history.seconds, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            bar.close()
            writer.close()
        seconds = history.seconds
        if plan.shards:
            try:
                self._write_shard_index()
            except OutputWriteError as exc:  # the books cannot be closed: the job stops here
                history.write("failed", seconds, error=str(exc))
                raise
        # One call at the end: memory, parallel, compile.
        history.take_rank_stats(engine.collective_rpc("get_cache_stats"))
        if stats.sheet:
            try:
                write_records_sheet(plan.output_dir, stats.sheet)
            except OutputWriteError as exc:  # a convenience: the images and records count
                logger.warning("no contact sheet: %s", exc)
        missing = books.missing()
        missing_count = plan.images_to_make - stats.made
        status = self._status(missing, missing_count)
        history.write(status, seconds, missing, missing_count)
        history.print_summary(seconds, missing, missing_count)
        return EXIT_OK if status == "complete" else EXIT_PARTIAL

    def _warm_up(
        self, engine: Any, batches: Iterator[list[OmniDiffusionRequest]]
    ) -> Iterator[list[OmniDiffusionRequest]]:
        """Every replica runs a copy of the first batch before the timed work, where the config
        asks (:meth:`DiffusionEngine.warm_up`); returns the batches, whole."""
        first = next(batches, None)
        if first is None:
            return batches
        self.history.warmed_up(engine.warm_up(first))
        return itertools.chain([first], batches)

    def _status(self, missing: list[tuple[str, int]], missing_count: int) -> str:
        """complete; stopped (--fail-fast); incomplete (images with no record at all: work was
        lost, never a success); items_failed."""
        if self.books.stats.stopped:
            return "stopped"
        if missing or missing_count > 0:
            logger.error(
                "%d planned image(s) have no record: %s",
                max(missing_count, len(missing)),
                ", ".join(f"{i}[{k}]" for i, k in missing[:20])
                + (" ..." if len(missing) > 20 else ""),
            )
            return "incomplete"
        return "items_failed" if self.books.stats.items_failed else "complete"
