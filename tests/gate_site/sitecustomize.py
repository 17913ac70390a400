"""Installs the test gates of ``tests/gates.py`` in a job's processes.

JobGate (``$SPMD_TEST_GATE_DIR``): on the processes that run the engine,
``ReplicaScheduler.drive`` hands out no further batch once ``$SPMD_TEST_GATE_AFTER`` batches
have been delivered (by at least ``$SPMD_TEST_GATE_RANKS`` different ranks), until
``$SPMD_TEST_GATE_DIR/release`` exists; and every worker writes ``rank-<rank>.pid`` there once
it has loaded (so a test can stop or kill a given rank).

Hold for a signal (``$SPMD_TEST_HOLD_FOR_SIGNAL_AT=N``): a replica leader running a batch
with progress on waits after step N until the engine's signal (a cancellation) has arrived,
so a test of cancellation between steps does not race the batch's end on a fast machine.

Inert unless those variables are set; nothing is imported before the project's own modules are."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

SCHEDULER, WORKER = "spmd_diffusion.engine.scheduler", "spmd_diffusion.worker.diffusion_worker"
HOLD_LIMIT_S = 300.0


def _hold(directory: Path) -> None:
    (directory / "held").touch()
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (directory / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class _GatedSource:
    """A work source that stops handing out work after ``after`` deliveries (made by at least
    ``ranks`` different ranks) until released."""

    def __init__(self, inner, directory: Path, after: int, ranks: int = 1) -> None:
        self._inner, self._directory, self._after, self._delivered = inner, directory, after, 0
        self._ranks, self._seen = ranks, set()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def take(self, now):
        due = self._delivered >= self._after and len(self._seen) >= self._ranks
        if due and not (self._directory / "release").exists():
            _hold(self._directory)
        return self._inner.take(now)

    def finished(self, work, output):
        verdict = self._inner.finished(work, output)
        self._delivered += 1
        self._seen.add(getattr(output, "rank", None))
        return verdict


def _patch_scheduler(module) -> None:
    directory, after = (
        Path(os.environ["SPMD_TEST_GATE_DIR"]),
        int(os.environ.get("SPMD_TEST_GATE_AFTER", "1")),
    )
    ranks = int(os.environ.get("SPMD_TEST_GATE_RANKS", "1"))
    original = module.ReplicaScheduler.drive

    def drive(self, source, timeout=None):
        return original(self, _GatedSource(source, directory, after, ranks), timeout)

    module.ReplicaScheduler.drive = drive


def _patch_worker(module) -> None:
    directory = Path(os.environ["SPMD_TEST_GATE_DIR"])
    original = module.DiffusionWorker.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        (directory / f"rank-{self.rank}.pid").write_text(str(os.getpid()))

    module.DiffusionWorker.__init__ = __init__


STEP_WATCH = "spmd_diffusion.worker.step_watch"


def hold_for_signal(module, at_step: int):
    """Make ``module.StepWatch`` hold its leader after step ``at_step`` until a signal arrives
    (read into the watch, so its next check sees it), once per process (the next batches run
    freely); returns the original ``watch`` to restore."""
    original = module.StepWatch.watch
    holds = [1]

    def watch(self, request_ids, steps):
        inner = original(self, request_ids, steps)

        def after_step(step, total):
            if step + 1 == at_step and self.channel is not None and holds[0]:
                holds[0] = 0
                deadline = time.monotonic() + HOLD_LIMIT_S
                while not self.cancelled and time.monotonic() < deadline:
                    self._read_signals()
                    time.sleep(0.005)
            try:
                return inner(step, total)
            finally:
                if self.cancelled:
                    holds[0] = (
                        0  # the cancellation came (maybe before the hold): later batches run freely
                    )

        return after_step

    module.StepWatch.watch = watch
    return original


def _patch_step_watch(module) -> None:
    hold_for_signal(module, int(os.environ["SPMD_TEST_HOLD_FOR_SIGNAL_AT"]))


PATCHES = {}
if os.environ.get("SPMD_TEST_GATE_DIR"):
    PATCHES.update({SCHEDULER: _patch_scheduler, WORKER: _patch_worker})
if os.environ.get("SPMD_TEST_HOLD_FOR_SIGNAL_AT"):
    PATCHES[STEP_WATCH] = _patch_step_watch


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending = dict(PATCHES)

    def find_spec(self, name, path, target=None):
        patch = self.pending.pop(name, None)
        if patch is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


if PATCHES:
    sys.meta_path.insert(0, _PatchOnImport())
