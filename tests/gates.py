"""Gates that hold a job at a state the test controls, so no verdict depends on how fast the
machine is.

- :class:`DenoiserGate` (in-process engines): the denoiser's next call blocks until the test
  releases it, so "a batch is running" and "the next batch has not started" are facts.
- :class:`JobGate` (``omni-diffuse`` subprocesses, any launcher): the engine stops handing out
  batches once ``after`` of them have been delivered (their manifest records written), writes
  ``held`` in its directory and waits for ``release``. A kill or a signal sent while it is
  held always lands mid-run, whatever the machine's speed. It is installed by the
  ``sitecustomize`` in ``tests/gate_site`` on the processes that inherit its environment.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

from spmd_diffusion.worker import step_watch

GATE_SITE = Path(__file__).parent / "gate_site"
HOLD_LIMIT_S = 300.0  # a test that forgets to release fails instead of hanging forever


class DenoiserGate:
    """Holds the denoiser of the in-process worker of ``engine`` (a ``DiffusionEngine`` on the
    ``uni`` executor) at its next call until :meth:`release`; a context manager that removes
    itself. The hook is set on the worker object directly: an RPC would pickle it."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.entered = threading.Event()
        self.released = threading.Event()
        self.handles: list[Any] = []

    def _hook(self, module: Any, args: Any) -> None:
        self.entered.set()
        self.released.wait(HOLD_LIMIT_S)

    def __enter__(self) -> DenoiserGate:
        worker = self.engine.executor.local.worker
        self.handles = [worker.denoiser.register_forward_pre_hook(self._hook)]
        return self

    def wait_entered(self, timeout: float = 120.0) -> None:
        assert self.entered.wait(timeout), "no batch reached the denoiser"

    def release(self) -> None:
        self.released.set()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
        for handle in self.handles:
            handle.remove()


class JobGate:
    """The subprocess side: ``env()`` for the job, ``wait_held()``, then ``release()``."""

    def __init__(self, directory: Path, after: int = 1, ranks: int = 1) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.after, self.ranks = after, ranks

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GATE_SITE), env.get("PYTHONPATH")]))
        env["SPMD_TEST_GATE_DIR"] = str(self.directory)
        env["SPMD_TEST_GATE_AFTER"] = str(self.after)
        env["SPMD_TEST_GATE_RANKS"] = str(self.ranks)
        return env

    @property
    def held(self) -> bool:
        return (self.directory / "held").exists()

    def wait_held(self, job: Any, timeout: float = 180.0) -> None:
        """Until the engine holds (``job``, a Popen, must still be running)."""
        deadline = time.monotonic() + timeout
        while not self.held:
            assert job.poll() is None, (
                f"the job ended (exit {job.returncode}) before the gate held it"
            )
            assert time.monotonic() < deadline, "the gate did not hold the job"
            time.sleep(0.05)

    def release(self) -> None:
        (self.directory / "release").touch()

    def pid_of(self, rank: int) -> int:
        """The pid of the process that runs rank ``rank``'s worker."""
        return int((self.directory / f"rank-{rank}.pid").read_text())


class SlowDenoiser:
    """Makes every denoiser call of an in-process (``uni``) engine take ``seconds`` longer: a
    slow machine, for checking that a verdict does not depend on the machine's speed."""

    def __init__(self, engine: Any, seconds: float) -> None:
        self.engine, self.seconds, self.handle = engine, seconds, None

    def __enter__(self) -> SlowDenoiser:
        if self.seconds:
            worker = self.engine.executor.local.worker
            self.handle = worker.denoiser.register_forward_pre_hook(
                lambda module, args: time.sleep(self.seconds)
            )
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.handle is not None:
            self.handle.remove()


class HoldForSignal:
    """The replica leader of a batch with progress on waits after step ``at_step`` until the
    engine's signal (a cancellation) has arrived: in this process as a context manager, or in
    a job's processes through ``env()`` (see gate_site/sitecustomize.py)."""

    def __init__(self, at_step: int = 1) -> None:
        self.at_step = at_step
        self.original: Any = None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GATE_SITE), env.get("PYTHONPATH")]))
        env["SPMD_TEST_HOLD_FOR_SIGNAL_AT"] = str(self.at_step)
        return env

    def __enter__(self) -> HoldForSignal:

        spec = importlib.util.spec_from_file_location(
            "gate_site_patches", GATE_SITE / "sitecustomize.py"
        )
        patches = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(patches)
        self.original = patches.hold_for_signal(step_watch, self.at_step)
        return self

    def __exit__(self, *exc_info: Any) -> None:

        step_watch.StepWatch.watch = self.original
