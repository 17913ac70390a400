"""One worker rank inside a Ray actor, and the transport that reaches such actors.

The actor answers the same :class:`~.protocol.RpcRequest` tuples as every other worker, one
actor method call per request. Ray runs an actor's calls one at a time in the order one
caller submitted them, which is the order the executor's send lock gives every rank, so the
ranks of a tensor-parallel replica agree on what they run next without a serve loop.

Replies come back as Ray objects (large images through Ray's object store, not a pipe).
An actor that dies fails its pending calls with Ray's ``RayActorError``, seen within tens of
milliseconds of a SIGKILL on one node, and reported here as
:class:`~spmd_diffusion.errors.WorkerDiedError` naming the rank.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (ray); project modules load where used
# (utils.logs): they pull in heavy modules or import back into this one

from __future__ import annotations

import os
import queue
import time
from collections.abc import Collection
from typing import Any

from spmd_diffusion.distributed.protocol import (
    MessageKind,
    RpcReply,
    RpcRequest,
    answer,
    failure_from_exception,
    reply_from_wire,
    reply_to_wire,
    request_from_wire,
    request_to_wire,
)
from spmd_diffusion.distributed.serve_loop import UnloadedWorker, WorkerPlacement, load_worker
from spmd_diffusion.distributed.transport import Transport
from spmd_diffusion.errors import WorkerDiedError


class RayWorkerActor:
    """The body of one worker actor (wrapped with ``ray.remote`` by the executor)."""

    def __init__(self, placement: WorkerPlacement, env: dict[str, str]) -> None:
        os.environ.update(env)
        from spmd_diffusion.utils.logs import setup_logging

        setup_logging(placement.rank)
        self.placement = placement
        self.worker: Any = None

    def where(self) -> tuple[int, str]:
        """This actor's process id and node address."""
        import ray

        return os.getpid(), ray.util.get_node_ip_address()

    def handle(self, wire: tuple) -> tuple:
        """Answer one request (START loads the worker; SHUTDOWN releases it)."""
        request = request_from_wire(wire)
        rank = self.placement.rank
        if request.kind is MessageKind.START:
            od_config, rendezvous = request.args
            self.worker, reply = load_worker(od_config, self.placement, rendezvous)
            return reply_to_wire(reply._replace(call_id=request.call_id))
        if request.kind in (MessageKind.SHUTDOWN, MessageKind.DISCONNECT):
            self._release()
            return reply_to_wire(RpcReply(rank, request.kind.name.lower(), None, request.call_id))
        if request.kind is MessageKind.CALL:
            return reply_to_wire(answer(self.worker, rank, request))
        error = RuntimeError(f"unexpected {request.kind.name} message for a Ray worker")
        return reply_to_wire(
            RpcReply(rank, None, failure_from_exception(rank, error), request.call_id)
        )

    def _release(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None and not isinstance(worker, UnloadedWorker):
            worker.shutdown()


class RayTransport(Transport):
    """Requests as actor calls; each reply arrives through its object ref's future.

    A done-callback per call puts the finished future in one queue, so a poll blocks on that
    queue instead of scanning every ref in flight with ``ray.wait``, which doubled the cost of
    a call (benchmarks/RESULTS.md, "Measurements behind design choices")."""

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self.world_size = len(actors)
        self._arrived: queue.Queue[tuple[Any, int, int]] = queue.Queue()
        self._held: list[tuple[Any, int, int]] = []  # arrived for ranks nobody polled for yet

    def send(self, rank: int, request: RpcRequest) -> None:
        future = self.actors[rank].handle.remote(request_to_wire(request)).future()
        future.add_done_callback(lambda done: self._arrived.put((done, rank, request.call_id)))

    def signal(self, rank: int, request: RpcRequest) -> bool:
        return False  # an actor runs one call at a time: a signal would arrive after the call

    def poll(self, ranks: Collection[int], timeout: float | None) -> list[RpcReply]:
        wanted = set(ranks)
        found = [item for item in self._held if item[1] in wanted]
        self._held = [item for item in self._held if item[1] not in wanted]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not found:
            try:
                item = self._arrived.get(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
                )
            except queue.Empty:
                return []
            (found if item[1] in wanted else self._held).append(item)
        while True:  # and whatever else is in already
            try:
                item = self._arrived.get_nowait()
            except queue.Empty:
                break
            (found if item[1] in wanted else self._held).append(item)
        return [self._reply(*item) for item in found]

    @staticmethod
    def _reply(future: Any, rank: int, call_id: int) -> RpcReply:
        from ray.exceptions import RayActorError

        try:
            return reply_from_wire(future.result())
        except RayActorError:
            raise WorkerDiedError(rank, None) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a result Ray could not serialise
            return RpcReply(rank, None, failure_from_exception(rank, exc), call_id)
