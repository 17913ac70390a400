"""``omni-diffuse generate``: prompts in, images and a manifest out, resumably.

Rank 0 plans the job (reads and checks the input, fixes every seed, cuts the item list into
fixed batches, drops the batches a previous run finished), then streams the batches over
all replicas and writes each output as it arrives: images atomically, one manifest line per
image, a progress bar, and at the end ``run.json``, a contact sheet and a summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spmd_diffusion import __version__
from spmd_diffusion.engine.batching import chunk_requests
from spmd_diffusion.jobs.contact_sheet import write_contact_sheet
from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.jobs.files import write_atomic
from spmd_diffusion.utils.images import png_bytes
from spmd_diffusion.jobs.manifest import ManifestWriter, done_images, fingerprint, image_name
from spmd_diffusion.jobs.prompts import InputError, PromptItem, read_items
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.engine.seeding import derive_seed

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
    batch_size: int = 4
    resume: bool = True
    fail_fast: bool = False


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


def build_requests(items: list[PromptItem], options: GenerateOptions, run_seed: int) -> list[OmniDiffusionRequest]:
    """One request per item: run-wide settings, overridden by the item's own."""
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
        settings.setdefault("seed", None)
        if settings["seed"] is None:
            settings["seed"] = derive_seed(run_seed, item.id)
        try:
            requests.append(
                OmniDiffusionRequest(
                    prompt=item.prompt, request_id=item.id, num_images_per_prompt=options.images_per_prompt, **settings
                )
            )
        except ValueError as exc:
            raise InputError(f"item {item.id!r} (line {item.line}): {exc}") from None
    return requests


def plan_generation(options: GenerateOptions, config: OmniDiffusionConfig) -> GeneratePlan:
    """Everything rank 0 decides before any model loads; bad input raises InputError."""
    output_dir = Path(options.output)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {options.output!r} exists and is not a directory")
    items = read_items(options.prompts_file, options.prompts)
    requests = build_requests(items, options, config.seed)
    chunks = chunk_requests(requests, options.batch_size * options.images_per_prompt)
    done = done_images(output_dir, requests, config.model) if options.resume else set()
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
    stopped: bool = False


class GenerateJob:
    """Writes each batch output as it arrives; ``run`` returns the exit code."""

    def __init__(self, plan: GeneratePlan, layout: dict[str, Any]) -> None:
        self.plan = plan
        self.layout = layout
        self.stats = JobStats()
        self.metadata = {item.id: item.meta for item in plan.items}
        self.requests = {r.request_id: r for r in plan.requests}
        self.images_dir = plan.output_dir / "images"

    def _write_run_json(self, status: str, started: float, seconds: float | None = None) -> None:
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
                "items_failed": len(stats.items_failed),
                "batches_run": len(self.plan.batches),
                "images_per_rank": dict(sorted(stats.per_rank.items())),
            },
        }
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
            record["images_per_second"] = round(made / seconds, 4) if seconds > 0 else None
        write_atomic(self.plan.output_dir / "run.json", (json.dumps(record, indent=2, default=repr) + "\n").encode())

    def _records(self, output: DiffusionOutput) -> list[dict[str, Any]]:
        """Write the images of one output and return its manifest lines."""
        records = []
        for position, request_id in enumerate(output.request_ids):
            request = self.requests[request_id]
            error = output.errors[position]
            images = output.images[position]
            settings = output.metadata[position]
            count = request.num_images_per_prompt
            seconds = settings.get("seconds", 0.0) / max(1, count)
            for index in range(count):
                if (request_id, index) in self.plan.done:
                    continue  # a redone batch: this image was already on disk, identical
                record = {
                    "id": request_id,
                    "index": index,
                    "prompt": request.prompt,
                    "negative_prompt": request.negative_prompt,
                    "seed": output.seeds[position][index] if output.seeds[position] else request.seed + index,
                    "num_inference_steps": settings.get("num_inference_steps", request.num_inference_steps),
                    "guidance_scale": settings.get("guidance_scale", request.guidance_scale),
                    "height": settings.get("height", request.height),
                    "width": settings.get("width", request.width),
                    "model": self.plan.config.model,
                    "fingerprint": fingerprint(request, self.plan.config.model),
                    "path": None,
                    "status": "error",
                    "error": error,
                    "seconds": round(seconds, 4),
                    "rank": settings.get("rank", output.rank),
                    "meta": self.metadata.get(request_id, {}),
                }
                if error is None and index < len(images):
                    relative = Path("images") / image_name(request_id, index, count)
                    write_atomic(self.plan.output_dir / relative, png_bytes(images[index]))
                    record.update(path=str(relative), status="ok")
                    self.stats.images_ok += 1
                    self.stats.per_rank[record["rank"]] += 1
                    if len(self.stats.sheet) < CONTACT_SHEET_IMAGES:
                        self.stats.sheet.append((request_id, self.plan.output_dir / relative))
                else:
                    record["error"] = error or "no image returned"
                    self.stats.images_failed += 1
                    self.stats.items_failed.add(request_id)
                records.append(record)
        return records

    def run(self, engine: Any) -> int:
        from tqdm import tqdm

        plan = self.plan
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
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
            engine.generate_stream(plan.batches, on_output)
        finally:
            bar.close()
            writer.close()
        seconds = time.time() - started
        if self.stats.sheet:
            write_contact_sheet(plan.output_dir / "contact_sheet.png", self.stats.sheet)
        status = "stopped" if self.stats.stopped else ("complete" if not self.stats.items_failed else "items_failed")
        self._write_run_json(status, started, seconds)
        self._print_summary(seconds)
        return EXIT_OK if not self.stats.items_failed and not self.stats.stopped else EXIT_PARTIAL

    def _print_summary(self, seconds: float) -> None:
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
        rows += [(f"images by rank {rank}", count) for rank, count in sorted(stats.per_rank.items())]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        print("summary\n" + "\n".join(lines) + f"\n  output: {self.plan.output_dir}", file=sys.stderr)
