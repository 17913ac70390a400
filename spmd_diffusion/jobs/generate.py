"""``omni-diffuse generate``: prompts in, images and a manifest out, resumably.

Rank 0 plans the job (reads and checks the input, fixes every seed, cuts the item list into
fixed batches, drops the batches a previous run finished), then streams the batches over
all replicas. Each replica's leader writes its own images (atomically); rank 0 receives one
small record per image and keeps the books: the manifest, the progress bar, and at the end
``run.json``, a contact sheet, a summary, and the check that every planned image has a
record -- a batch that went missing makes the run incomplete (exit 3), never a success.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spmd_diffusion import __version__
from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.engine.batching import chunk_requests
from spmd_diffusion.engine.seeding import with_seed
from spmd_diffusion.errors import InputError
from spmd_diffusion.jobs.contact_sheet import write_contact_sheet
from spmd_diffusion.jobs.files import write_atomic
from spmd_diffusion.jobs.manifest import MANIFEST_NAME, ManifestWriter, done_images, fingerprint
from spmd_diffusion.jobs.outputs import IMAGES_DIR, ImageFileSink
from spmd_diffusion.jobs.prompts import PromptItem, read_items
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
CONTACT_SHEET_IMAGES = 16


@dataclass
class GenerateOptions:
    """The generation settings of one run (item files may override the per-item ones)."""

    output: str
    prompts_file: str | None = None
    prompts: tuple[str, ...] = ()
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    images_per_prompt: int = 1
    batch_size: int = 4  # prompts per batch
    resume: bool = True
    fail_fast: bool = False


    @property
    def images_per_batch(self) -> int:
        """A batch is the unit a replica takes and one pipeline call: ``batch_size`` prompts of
        ``images_per_prompt`` images each (it becomes ``OmniDiffusionConfig.max_batch_size``)."""
        return self.batch_size * self.images_per_prompt


@dataclass
class GeneratePlan:
    output_dir: Path
    items: list[PromptItem]
    requests: list[OmniDiffusionRequest]
    batches: list[list[OmniDiffusionRequest]]
    done: set[tuple[str, int]]
    options: GenerateOptions
    config: OmniDiffusionConfig

    @property
    def images_total(self) -> int:
        return sum(r.num_images_per_prompt for r in self.requests)

    @property
    def images_to_make(self) -> int:
        return self.images_total - len(self.done)


def build_requests(
    items: list[PromptItem], options: GenerateOptions, run_seed: int, config: OmniDiffusionConfig | None = None
) -> list[OmniDiffusionRequest]:
    """One request per item: run-wide settings, overridden by the item's own, within the
    config's limits."""
    requests = []
    for item in items:
        settings: dict[str, Any] = {
            "negative_prompt": options.negative_prompt,
            "num_inference_steps": options.steps,
            "guidance_scale": options.guidance,
            "height": options.height,
            "width": options.width,
        }
        settings.update(item.settings)
        try:
            request = OmniDiffusionRequest(
                prompt=item.prompt, request_id=item.id, num_images_per_prompt=options.images_per_prompt, **settings
            )
            if config is not None:
                config.check_limits(request)
            requests.append(with_seed(request, run_seed))
        except ValueError as exc:
            raise InputError(f"item {item.id!r} (line {item.line}): {exc}") from None
    return requests


def run_settings(options: GenerateOptions, config: OmniDiffusionConfig) -> dict[str, Any]:
    """The run-wide settings that change pixels, for the resume fingerprint."""
    return {"model_class_name": config.model_class_name, "dtype": config.dtype, "batch_invariant": config.batch_invariant,
            "images_per_batch": options.images_per_batch, "variant": config.variant, "revision": config.revision}


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output directory the job could not write, before any model loads."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {str(output_dir)!r} exists and is not a directory")
    for name, kind in ((MANIFEST_NAME, "file"), ("run.json", "file"), (IMAGES_DIR, "directory")):
        path = output_dir / name
        if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
            raise InputError(f"--output {str(output_dir)!r}: {name} exists and is not a {kind}")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output {str(output_dir)!r} is not writable (checked {str(existing)!r})")


def plan_generation(options: GenerateOptions, config: OmniDiffusionConfig) -> GeneratePlan:
    """Everything rank 0 decides before any model loads; bad input raises InputError."""
    output_dir = Path(options.output)
    check_output_dir(output_dir)
    items = read_items(options.prompts_file, options.prompts)
    requests = build_requests(items, options, config.seed, config)
    chunks = chunk_requests(requests, options.images_per_batch)
    done = done_images(output_dir, requests, config.model, run_settings(options, config)) if options.resume else set()
    # A batch is redone whole when any of its images is missing: batch composition, and so
    # every pixel, stays what a full run would give.
    remaining = [
        chunk
        for chunk in chunks
        if any((r.request_id, k) not in done for r in chunk for k in range(r.num_images_per_prompt))
    ]
    return GeneratePlan(output_dir, items, requests, remaining, done, options, config)


def versions() -> dict[str, str]:
    found = {"spmd_diffusion": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "mpi4py"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


@dataclass
class JobStats:
    images_ok: int = 0
    images_failed: int = 0
    items_failed: set[str] = field(default_factory=set)
    per_rank: Counter = field(default_factory=Counter)
    sheet: list[tuple[str, Path]] = field(default_factory=list)
    accounted: set[tuple[str, int]] = field(default_factory=set)
    stopped: bool = False


MISSING_LISTED = 1000  # ids of missing images named in run.json (all are counted)


class GenerateJob:
    """Keeps the books of a run: each batch's records arrive (the replica leaders wrote the
    images), rank 0 appends them to the manifest; ``run`` returns the exit code."""

    def __init__(self, plan: GeneratePlan, layout: dict[str, Any]) -> None:
        self.plan = plan
        self.layout = layout
        self.stats = JobStats()
        self.metadata = {item.id: item.meta for item in plan.items}
        self.requests = {r.request_id: r for r in plan.requests}
        self.settings = run_settings(plan.options, plan.config)
        self.done_by_id: dict[str, set[int]] = {}
        for request_id, index in plan.done:
            self.done_by_id.setdefault(request_id, set()).add(index)

    def sink(self, batch: list[OmniDiffusionRequest]) -> ImageFileSink:
        """Where the replica running ``batch`` writes its images (skipping those already done)."""
        skip = frozenset((r.request_id, k) for r in batch for k in self.done_by_id.get(r.request_id, ()))
        return ImageFileSink(str(self.plan.output_dir), {r.request_id: r.num_images_per_prompt for r in batch}, skip)

    def planned_images(self) -> set[tuple[str, int]]:
        """Every image this run must account for: all of its batches' images not done before."""
        return {
            (r.request_id, k)
            for batch in self.plan.batches
            for r in batch
            for k in range(r.num_images_per_prompt)
            if k not in self.done_by_id.get(r.request_id, ())
        }

    previous_run: dict[str, Any] | None = None

    def _write_run_json(self, status: str, started: float, seconds: float | None = None,
                        missing: list[tuple[str, int]] | None = None, error: str | None = None) -> None:
        stats = self.stats
        made = stats.images_ok + stats.images_failed
        record = {
            "status": status,
            "command": sys.argv,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "config": self.plan.config.to_dict(),
            "options": dataclasses.asdict(self.plan.options),
            "layout": self.layout,
            "versions": versions(),
            "totals": {
                "items": len(self.plan.requests),
                "images": self.plan.images_total,
                "images_skipped_as_done": len(self.plan.done),
                "images_ok": stats.images_ok,
                "images_failed": stats.images_failed,
                "images_missing": len(missing or ()),
                "items_failed": len(stats.items_failed),
                "batches_run": len(self.plan.batches),
                "images_per_rank": dict(sorted(stats.per_rank.items())),
            },
        }
        if error is not None:
            record["error"] = error
        if self.previous_run is not None:
            record["attempt"] = self.previous_run.get("attempt", 1) + 1
            record["previous_run"] = self.previous_run
        if missing:
            record["missing"] = [{"id": request_id, "index": index} for request_id, index in missing[:MISSING_LISTED]]
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
            record["images_per_second"] = round(made / seconds, 4) if seconds > 0 else None
        write_atomic(self.plan.output_dir / "run.json", (json.dumps(record, indent=2, default=repr, allow_nan=False) + "\n").encode())

    def _record(self, request: OmniDiffusionRequest, index: int, output: DiffusionOutput, position: int,
                files: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """The manifest line of image ``index`` of ``request`` (ok when its file was written)."""
        settings = output.metadata[position]
        count = request.num_images_per_prompt
        seeds = output.seeds[position]
        record = {
            "id": request.request_id,
            "index": index,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": seeds[index] if index < len(seeds) else request.seed + index,
            "num_inference_steps": settings.get("num_inference_steps", request.num_inference_steps),
            "guidance_scale": settings.get("guidance_scale", request.guidance_scale),
            "height": settings.get("height", request.height),
            "width": settings.get("width", request.width),
            "model": self.plan.config.model,
            "fingerprint": fingerprint(request, self.plan.config.model, self.settings),
            "path": None,
            "status": "error",
            "error": output.errors[position],
            "seconds": round(settings.get("seconds", 0.0) / max(1, count), 4),
            "rank": settings.get("rank", output.rank),
            "meta": self.metadata.get(request.request_id, {}),
        }
        written = files.get(index)
        if record["error"] is None and written is not None:
            record.update(path=written["path"], status="ok", sha256=written["sha256"], bytes=written["bytes"],
                          written_by=written["written_by"])
        else:
            record["error"] = record["error"] or "no image returned"
        return record

    def _records(self, output: DiffusionOutput) -> list[dict[str, Any]]:
        """The manifest lines of one batch output, counted into the job's totals."""
        records = []
        for position, request_id in enumerate(output.request_ids):
            request = self.requests.get(request_id)
            if request is None:
                continue  # not an item of this run: nothing to account for
            files = {entry["index"]: entry for entry in output.metadata[position].get("files", ())}
            for index in range(request.num_images_per_prompt):
                if index in self.done_by_id.get(request_id, ()) or (request_id, index) in self.stats.accounted:
                    continue  # a redone batch: this image was already on disk
                record = self._record(request, index, output, position, files)
                self.stats.accounted.add((request_id, index))
                if record["status"] == "ok":
                    self.stats.images_ok += 1
                    self.stats.per_rank[record["rank"]] += 1
                    if len(self.stats.sheet) < CONTACT_SHEET_IMAGES:
                        self.stats.sheet.append((request_id, self.plan.output_dir / record["path"]))
                else:
                    self.stats.images_failed += 1
                    self.stats.items_failed.add(request_id)
                records.append(record)
        return records

    def run(self, engine: Any) -> int:
        from tqdm import tqdm

        plan = self.plan
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        self.previous_run = previous_run(plan.output_dir / "run.json") if plan.options.resume else None
        self._write_run_json("running", started)
        writer = ManifestWriter(plan.output_dir, fresh=not plan.options.resume)
        if plan.done:
            logger.info("resuming: %d of %d images already done", len(plan.done), plan.images_total)
        bar = tqdm(total=plan.images_to_make, unit="img", desc="generate", dynamic_ncols=True, file=sys.stderr)

        def on_output(output: DiffusionOutput) -> bool:
            before = self.stats.images_ok + self.stats.images_failed
            writer.append(self._records(output))
            bar.update(self.stats.images_ok + self.stats.images_failed - before)
            if plan.options.fail_fast and self.stats.images_failed:
                self.stats.stopped = True
                return False
            return True

        try:
            engine.generate_stream(plan.batches, on_output, sinks=[self.sink(batch) for batch in plan.batches])
        except KeyboardInterrupt:
            self._write_run_json("interrupted", started, time.time() - started)
            raise
        except Exception as exc:  # a fault that ends the job (a worker died, a timeout): say so
            self._write_run_json("failed", started, time.time() - started, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            bar.close()
            writer.close()
        seconds = time.time() - started
        if self.stats.sheet:
            write_contact_sheet(plan.output_dir / "contact_sheet.png", self.stats.sheet)
        missing = sorted(self.planned_images() - self.stats.accounted)
        status = self._status(missing)
        self._write_run_json(status, started, seconds, missing)
        self._print_summary(seconds, missing)
        return EXIT_OK if status == "complete" else EXIT_PARTIAL

    def _status(self, missing: list[tuple[str, int]]) -> str:
        """complete; stopped (--fail-fast); incomplete (images with no record at all: work was
        lost, never a success); items_failed."""
        if self.stats.stopped:
            return "stopped"
        if missing:
            logger.error("%d planned image(s) have no record: %s", len(missing),
                         ", ".join(f"{i}[{k}]" for i, k in missing[:20]) + (" ..." if len(missing) > 20 else ""))
            return "incomplete"
        return "items_failed" if self.stats.items_failed else "complete"

    def _print_summary(self, seconds: float, missing: list[tuple[str, int]]) -> None:
        stats, made = self.stats, self.stats.images_ok + self.stats.images_failed
        rows = [
            ("items", len(self.plan.requests)),
            ("images ok", stats.images_ok),
            ("images failed", stats.images_failed),
            ("images already done", len(self.plan.done)),
            ("seconds", f"{seconds:.1f}"),
            ("images/s", f"{made / seconds:.2f}" if seconds > 0 else "-"),
            ("layout", f"{self.layout.get('replicas', 1)} replica(s) x {self.layout.get('replica_size', 1)} rank(s)"),
        ]
        if missing:
            rows.append(("images missing", f"{len(missing)}: " + ", ".join(sorted({i for i, _ in missing})[:10])))
        rows += [(f"images by rank {rank}", count) for rank, count in sorted(stats.per_rank.items())]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        print("summary\n" + "\n".join(lines) + f"\n  output: {self.plan.output_dir}", file=sys.stderr)


def previous_run(path: Path) -> dict[str, Any] | None:
    """What ``path`` (run.json) says of the run before this one. A run still marked
    ``running`` was killed without closing its books (SIGKILL, a lost node, a requeue that
    did not wait): it is reported as ``killed``, so the job's history never claims a run
    that no longer exists."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    status = record.get("status")
    if status == "running":
        status = "killed"
        logger.warning("the previous run (started %s) ended without closing its books: it was killed; resuming",
                       record.get("started_at", "?"))
    summary = {"status": status, "started_at": record.get("started_at"), "attempt": record.get("attempt", 1),
               "totals": record.get("totals")}
    if record.get("error"):
        summary["error"] = record["error"]
    return summary
