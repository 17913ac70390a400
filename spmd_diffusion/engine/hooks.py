"""Monitoring hooks: what the engine tells observers, and how observers are named.

The engine calls every hook in this order for each request: ``request_queued`` (when it
enters the engine), ``batch_started`` (its batch went to a replica), ``denoising_step``
(once per step of that batch), ``batch_finished``, then ``request_done`` or
``request_failed`` (or ``request_cancelled`` for one dropped before it started: its
caller went away or the engine closed). Times are ``time.monotonic()`` seconds on rank 0.

Steps run on the replica; their durations come back with the batch's output and are
reported when the batch finishes (one message to rank 0 per step would cost an RPC per
step, a visible share of a small model's step).

A hook that raises is logged once and never fails a request: observers must not be able
to lose results. Hooks are named by built-in name (``prometheus``, ``trace:PATH``), by a
dotted path ``package.module:Class`` / ``package.module.Class`` (called with no arguments),
or by an entry point in the group ``spmd_diffusion.hooks``.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (prometheus_client); project modules
# load where used (engine.prometheus_hooks, engine.trace_hooks): they pull in heavy modules or
# import back into this one

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from spmd_diffusion.utils.imports import import_by_path

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "spmd_diffusion.hooks"


@dataclass(frozen=True)
class BatchInfo:
    """One batch on one replica."""

    batch_id: int
    replica: int
    request_ids: tuple[str, ...]
    images: int
    started_at: float
    queued_at: tuple[float, ...] = field(default=())  # per request, same order as request_ids


class EngineHooks:
    """Subclass and override the events you want; every method is a no-op here."""

    def request_queued(self, request_id: str, images: int, at: float) -> None:
        """A request entered the engine."""

    def batch_started(self, batch: BatchInfo) -> None:
        """A batch went to ``batch.replica``."""

    def denoising_step(self, batch: BatchInfo, step: int, seconds: float) -> None:
        """Step ``step`` of ``batch`` took ``seconds`` on its replica."""

    def batch_finished(self, batch: BatchInfo, seconds: float, failed: int) -> None:
        """``batch`` came back after ``seconds``; ``failed`` of its requests failed."""

    def batch_progress(
        self, batch: BatchInfo, request_ids: tuple[str, ...], step: int, steps: int
    ) -> None:
        """``step`` of ``steps`` done in the pipeline call making ``request_ids`` (while the batch
        runs, a few times a second per replica; only where the engine asked for progress)."""

    def request_done(self, request_id: str, images: int, queue_s: float, latency_s: float) -> None:
        """A request's images exist (``latency_s`` counts from ``request_queued``)."""

    def request_failed(self, request_id: str, error: str, latency_s: float) -> None:
        """A request failed with ``error``."""

    def request_cancelled(self, request_id: str, latency_s: float) -> None:
        """A request was cancelled: dropped before its batch started, or stopped while it ran."""

    def close(self) -> None:
        """The engine is done: flush whatever is buffered."""


class HookList(EngineHooks):
    """Calls every hook in turn; a hook that raises is logged (once) and skipped."""

    def __init__(self, hooks: Sequence[EngineHooks] = ()) -> None:
        self.hooks = list(hooks)
        self._reported: set[tuple[int, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def add(self, hook: EngineHooks) -> None:
        self.hooks.append(hook)

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is None:
                continue  # a duck-typed hook may watch only some events
            try:
                method(*args)
            except Exception as exc:  # noqa: BLE001 - an observer never fails a request
                if (id(hook), name) not in self._reported:
                    self._reported.add((id(hook), name))
                    logger.warning(
                        "hook %s.%s failed (reported once): %s", type(hook).__name__, name, exc
                    )

    def request_queued(self, request_id: str, images: int, at: float) -> None:
        self._call("request_queued", request_id, images, at)

    def batch_started(self, batch: BatchInfo) -> None:
        self._call("batch_started", batch)

    def denoising_step(self, batch: BatchInfo, step: int, seconds: float) -> None:
        self._call("denoising_step", batch, step, seconds)

    def batch_finished(self, batch: BatchInfo, seconds: float, failed: int) -> None:
        self._call("batch_finished", batch, seconds, failed)

    def batch_progress(
        self, batch: BatchInfo, request_ids: tuple[str, ...], step: int, steps: int
    ) -> None:
        self._call("batch_progress", batch, request_ids, step, steps)

    def request_done(self, request_id: str, images: int, queue_s: float, latency_s: float) -> None:
        self._call("request_done", request_id, images, queue_s, latency_s)

    def request_failed(self, request_id: str, error: str, latency_s: float) -> None:
        self._call("request_failed", request_id, error, latency_s)

    def request_cancelled(self, request_id: str, latency_s: float) -> None:
        self._call("request_cancelled", request_id, latency_s)

    def close(self) -> None:
        self._call("close")


def _hook_factory(spec: str) -> Callable[[], Any]:
    """What builds the hook ``spec`` names, found without building it (that may open files)."""
    name, _, argument = spec.partition(":")
    if name == "prometheus" and not argument:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ValueError(
                "the prometheus hook needs prometheus-client: pip install 'spmd_diffusion[serve]'"
            ) from None
        from spmd_diffusion.engine.prometheus_hooks import PrometheusHooks

        return PrometheusHooks
    if name == "trace":
        if not argument:
            raise ValueError("the trace hook needs a file: trace:PATH")
        from spmd_diffusion.engine.trace_hooks import TraceHooks

        return lambda: TraceHooks(argument)
    registered = {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}
    try:
        target = registered[spec].load() if spec in registered else import_by_path(spec)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load hook {spec!r}: {exc}") from None
    return target if isinstance(target, type) else lambda: target


def check_hook_spec(spec: str) -> None:
    """Raise ValueError unless ``spec`` names a hook (without building it)."""
    _hook_factory(spec)


def load_hook(spec: str | EngineHooks) -> EngineHooks:
    """One hook from its name (see the module docstring) or an instance."""
    if isinstance(spec, EngineHooks):
        return spec
    hook = _hook_factory(spec)()
    if not isinstance(hook, EngineHooks) and not any(
        hasattr(hook, n) for n in vars(EngineHooks) if n[0] != "_"
    ):
        raise ValueError(f"hook {spec!r} is a {type(hook).__name__}, not EngineHooks")
    return hook


def load_hooks(specs: Sequence[str | EngineHooks] | None) -> HookList:
    return HookList([load_hook(spec) for spec in specs or ()])
