"""Between the steps of a running batch: progress notes to the engine, and cancellation.

Only where the engine asks (``generate(..., progress={"interval_s": s})``: the server does, a
batch job does not, so a batch job pays nothing). The replica leader sends a
:class:`~spmd_diffusion.data.StepNote` at most every ``interval_s`` and at a
call's last step (a few small messages per second per replica, whatever the step rate), and
reads the signals the engine sent meanwhile.

Cancellation semantics: a pipeline call stops at the next step boundary once *every* request
in it was cancelled (diffusers' ``callback_on_step_end`` raises out of the loop, so neither the
remaining steps nor the VAE decode run). A call that still holds a request somebody waits for
runs to its end: the others in the same batch are never harmed, and the cancelled requests'
images are dropped by the engine. Every rank of a multi-rank replica must leave the loop at
the same step (its collectives would hang otherwise), so the leader's decision is shared at
every step by a one-element all-reduce over each mesh dimension of the replica (a CPU tensor:
gloo, also beside NCCL).
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from spmd_diffusion.data import StepNote
from spmd_diffusion.errors import CANCELLED

DEFAULT_INTERVAL_S = 0.25


class CallCancelled(Exception):
    """Ends a pipeline call whose requests were all cancelled (raised from its step callback)."""


def cancelled_error(request_id: str) -> str:
    return f"{CANCELLED}: request {request_id} was cancelled while it ran"


def replica_agreement(mesh: Any) -> Callable[[bool], bool] | None:
    """A function every rank of a replica calls with its flag, returning the flag of any rank
    (the leader's), or None for a one-rank replica."""
    import torch
    import torch.distributed as dist

    groups = [
        mesh[name].get_group() for name in ("cfg", "ring", "ulysses", "tp") if mesh[name].size() > 1
    ]
    if not groups:
        return None

    def agree(flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int32)
        for group in groups:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())

    return agree


class StepWatch:
    """One ``generate`` call's notes and cancellations (see the module docstring)."""

    def __init__(
        self, channel: Any, interval_s: float, leader: bool, agree: Callable[[bool], bool] | None
    ) -> None:
        self.channel = channel if leader else None
        self.interval_s = interval_s
        self.agree = agree
        self.cancelled: set[str] = set()

    def _read_signals(self) -> None:
        if self.channel is None:
            return
        for signal in self.channel.signals():
            self.cancelled.update(str(request_id) for request_id in signal.get("cancel", ()))

    def all_cancelled(self, request_ids: tuple[str, ...]) -> bool:
        """Whether every request of a call is cancelled (every rank of the replica agrees)."""
        self._read_signals()
        stop = self.channel is not None and set(request_ids) <= self.cancelled
        return self.agree(stop) if self.agree is not None else stop

    def watch(
        self, request_ids: tuple[str, ...], steps: int | None
    ) -> Callable[[int, int | None], None]:
        """The step callback of one pipeline call making ``request_ids``: ``(step, total)``."""
        last_note = [0.0]

        def after_step(step: int, total: int | None) -> None:
            total = total or steps or step + 1
            if self.channel is not None:
                now = time.monotonic()
                if now - last_note[0] >= self.interval_s or step + 1 >= total:
                    last_note[0] = now
                    self.channel.note(StepNote(request_ids, step + 1, total))
            if self.all_cancelled(request_ids):
                raise CallCancelled(", ".join(request_ids))

        return after_step
