"""``run.json``: what a job's run is doing or did, and the runs before it; the summary a run
prints at its end.

Written when the run starts (``running``), and again when it ends (complete, items_failed,
incomplete, stopped, interrupted or failed) with its totals, timing and what each rank said
of its memory and parallel modes. A resumed run reads its predecessor's record first, so the
job's history survives every restart (:func:`previous_run`).
"""

# ruff: noqa: PLC0415 - spmd_diffusion.parallel (torch) is imported only where a replica has ranks

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from spmd_diffusion import __version__
from spmd_diffusion.jobs.books import JobStats
from spmd_diffusion.jobs.files import write_state
from spmd_diffusion.jobs.plan import GeneratePlan
from spmd_diffusion.utils.clock import process_started

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
MISSING_LISTED = 1000  # ids of missing images named in run.json (all are counted)


def versions() -> dict[str, str]:
    found = {"spmd_diffusion": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "mpi4py"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


class RunHistory:
    """This run's ``run.json``. What the ranks report at the end (:meth:`take_rank_stats`)
    and the first output's arrival (:meth:`first_output_arrived`) go into it."""

    def __init__(self, plan: GeneratePlan, layout: dict[str, Any], stats: JobStats) -> None:
        self.plan = plan
        self.layout = layout
        self.stats = stats
        self.path = plan.output_dir / RUN_JSON
        self.started = time.time()
        self.previous: dict[str, Any] | None = None
        self.first_output: tuple[float, int] | None = None  # (when, images arrived by then)
        self.load_seconds: float | None = None  # the slowest rank's model load
        self.parallel: dict[str, Any] | None = None  # "parallel": what each parallel flag did
        self.memory: list[dict[str, Any]] = []  # "memory": each rank's weights, peak, levers
        self.compile_seconds: float | None = None  # --compile: the slowest rank's compile time
        self.warmup_seconds: float | None = None  # --warmup: the slowest rank's warm-up call

    def begin(self) -> None:
        """The run starts: read the previous run's record (on resume), say ``running``."""
        self.started = time.time()
        self.previous = previous_run(self.path) if self.plan.options.resume else None
        self.write("running")

    @property
    def seconds(self) -> float:
        return time.time() - self.started

    def warmed_up(self, seconds: float | None) -> None:
        """The replicas ran their warm-up call (None: none ran): the timed work starts now."""
        if seconds is not None:
            self.warmup_seconds = seconds
            self.started = time.time()

    def first_output_arrived(self) -> None:
        """The first batch output is in (it carries the warm-up: kernels, allocator)."""
        if self.first_output is None:
            self.first_output = (time.time(), self.stats.images_arrived)

    def take_rank_stats(self, ranks: list[Any]) -> None:
        """Each rank's ``get_cache_stats`` at the end: memory, load, parallel, compile."""
        self.memory = [
            rank["memory"] for rank in ranks if isinstance(rank, dict) and rank.get("memory")
        ]
        loads = [
            float(rank["load_seconds"])
            for rank in ranks
            if isinstance(rank, dict) and "load_seconds" in rank
        ]
        self.load_seconds = max(loads) if loads else None
        if self.plan.config.replica_size > 1:
            from spmd_diffusion.parallel import merge_parallel_stats

            self.parallel = merge_parallel_stats(ranks)
        if self.plan.config.compile:
            self.compile_seconds = max(float(rank.get("compile_seconds", 0.0)) for rank in ranks)

    def _timing(self, seconds: float) -> dict[str, Any]:
        """Where the run's time went: start-up before the generate phase (process start, imports,
        launch, loading), the slowest rank's load, the warm-up call (``--warmup``: outside the
        generate phase), the first output (which carries the first call's one-off costs when no
        warm-up ran), and the steady-state rate after it (images past the first output over the
        time past it)."""
        started = self.started
        warmup = self.warmup_seconds or 0.0
        timing: dict[str, Any] = {"startup_s": round(started - warmup - process_started(), 3)}
        if self.load_seconds is not None:
            timing["load_s"] = round(self.load_seconds, 3)
        if self.warmup_seconds is not None:
            timing["warmup_s"] = round(self.warmup_seconds, 3)
        if self.first_output is not None:
            first_at, first_images = self.first_output
            timing["first_output_s"] = round(first_at - started, 3)
            later = self.stats.images_arrived - first_images
            steady = started + seconds - first_at
            if later > 0 and steady > 0:
                timing["steady_images_per_second"] = round(later / steady, 4)
        return timing

    def write(
        self,
        status: str,
        seconds: float | None = None,
        missing: list[tuple[str, int]] | None = None,
        missing_count: int = 0,
        error: str | None = None,
    ) -> None:
        stats, plan = self.stats, self.plan
        made = stats.made
        record = {
            "status": status,
            "command": sys.argv,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "config": plan.config.to_dict(),
            "options": dataclasses.asdict(plan.options),
            "layout": self.layout,
            "versions": versions(),
            "totals": {
                "items": plan.items,
                "images": plan.images_total,
                "images_skipped_as_done": len(plan.done),
                "images_ok": stats.images_ok,
                "images_failed": stats.images_failed,
                "images_missing": missing_count,
                "items_failed": len(stats.items_failed),
                "batches_run": plan.batches_to_run,
                "images_per_rank": dict(sorted(stats.per_rank.items())),
                **({"shards_written": stats.shards_written} if plan.shards else {}),
            },
        }
        if self.parallel is not None:
            record["parallel"] = self.parallel
        if self.memory:
            record["memory"] = self.memory
        if error is not None:
            record["error"] = error
        if self.previous is not None:
            record["attempt"] = self.previous.get("attempt", 1) + 1
            record["previous_run"] = self.previous
        if missing:
            record["missing"] = [
                {"id": request_id, "index": index} for request_id, index in missing[:MISSING_LISTED]
            ]
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
            record["images_per_second"] = round(made / seconds, 4) if seconds > 0 else None
            record["timing"] = self._timing(seconds)
            if self.compile_seconds is not None:
                # Replicas compile at once, on their first batches: the slowest one's compile
                # time is what the run lost to it.
                record["compile_seconds"] = round(self.compile_seconds, 3)
                steady = seconds - self.compile_seconds
                record["images_per_second_excluding_compile"] = (
                    round(made / steady, 4) if steady > 0 else None
                )
        write_state(
            self.path, (json.dumps(record, indent=2, default=repr, allow_nan=False) + "\n").encode()
        )

    def print_summary(
        self, seconds: float, missing: list[tuple[str, int]], missing_count: int
    ) -> None:
        """The run's totals on stderr, for the person who started it."""
        stats, made = self.stats, self.stats.made
        rows = [
            ("items", self.plan.items),
            ("images ok", stats.images_ok),
            ("images failed", stats.images_failed),
            ("images already done", len(self.plan.done)),
            ("seconds", f"{seconds:.1f}"),
            ("images/s", f"{made / seconds:.2f}" if seconds > 0 else "-"),
        ]
        if self.compile_seconds is not None:
            steady = seconds - self.compile_seconds
            rows += [
                ("compile seconds", f"{self.compile_seconds:.1f}"),
                ("images/s excluding compile", f"{made / steady:.2f}" if steady > 0 else "-"),
            ]
        rows += [
            (
                "layout",
                f"{self.layout.get('replicas', 1)} replica(s) x "
                f"{self.layout.get('replica_size', 1)} rank(s)",
            ),
            *(parallel_rows(self.parallel) if self.parallel is not None else []),
            *memory_rows(self.memory),
        ]
        if self.plan.shards:
            rows.append(("shards written", stats.shards_written))
        if missing_count > 0:
            rows.append(
                (
                    "images missing",
                    f"{missing_count}: " + ", ".join(sorted({i for i, _ in missing})[:10]),
                )
            )
        rows += [
            (f"images by rank {rank}", count) for rank, count in sorted(stats.per_rank.items())
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        print(
            "summary\n" + "\n".join(lines) + f"\n  output: {self.plan.output_dir}", file=sys.stderr
        )


def memory_rows(memory: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Summary rows: each rank's peak memory and the denoiser's weights, and the levers on."""
    if not memory:
        return []
    mib = 2**20

    def peak(rank: dict[str, Any]) -> str:
        if "peak_allocated_bytes" in rank:
            return (
                f"{rank['peak_allocated_bytes'] / mib:.0f} MiB allocated "
                f"({rank['peak_reserved_bytes'] / mib:.0f} reserved)"
            )
        return f"{rank['peak_rss_bytes'] / mib:.0f} MiB resident"

    rows = [
        (
            f"memory rank {rank['rank']}",
            f"peak {peak(rank)}, denoiser weights "
            f"{rank.get('denoiser_weight_bytes', 0) / mib:.1f} MiB",
        )
        for rank in memory[:8]
    ]
    levers = memory[0].get("levers") or {}
    rows.append(
        ("memory levers", ", ".join(f"{name}={value}" for name, value in levers.items()) or "none")
    )
    return rows


def parallel_rows(merged: dict[str, Any]) -> list[tuple[str, str]]:
    from spmd_diffusion.parallel import parallel_summary

    return parallel_summary(merged)


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
        logger.warning(
            "the previous run (started %s) ended without closing its books: it was killed; "
            "resuming",
            record.get("started_at", "?"),
        )
    summary = {
        "status": status,
        "started_at": record.get("started_at"),
        "attempt": record.get("attempt", 1),
        "totals": record.get("totals"),
    }
    if record.get("error"):
        summary["error"] = record["error"]
    return summary
