"""One worker rank inside a Ray actor, and the transport that reaches such actors.

The actor answers the same :class:`~.protocol.RpcRequest` tuples as every other worker, one
actor method call per request. Ray runs an actor's calls one at a time in the order one
caller submitted them, which is the order the executor's send lock gives every rank, so the
ranks of a tensor-parallel replica agree on what they run next without a serve loop.

Replies come back as Ray objects (large images through Ray's object store, not a pipe).
An actor that dies fails its pending calls with Ray's ``RayActorError``, seen within tens of
milliseconds of a SIGKILL on one node (measured: 20 ms), and reported here as
:class:`~spmd_diffusion.errors.WorkerDiedError` naming the rank.
"""

from __future__ import annotations

import os
import threading
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
        return reply_to_wire(RpcReply(rank, None, failure_from_exception(rank, error), request.call_id))

    def _release(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None and not isinstance(worker, UnloadedWorker):
            worker.shutdown()


class RayTransport(Transport):
    """Requests as actor calls; replies as the object refs those calls return."""

    IDLE_SLICE_S = 0.01  # a poll with nothing in flight for the asked ranks

    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self.world_size = len(actors)
        self._in_flight: dict[Any, tuple[int, int]] = {}  # object ref -> (rank, call id)
        self._lock = threading.Lock()

    def send(self, rank: int, request: RpcRequest) -> None:
        ref = self.actors[rank].handle.remote(request_to_wire(request))
        with self._lock:
            self._in_flight[ref] = (rank, request.call_id)

    def poll(self, ranks: Collection[int], timeout: float | None) -> list[RpcReply]:
        import ray

        wanted = set(ranks)
        with self._lock:
            refs = [ref for ref, (rank, _) in self._in_flight.items() if rank in wanted]
        if not refs:
            time.sleep(self.IDLE_SLICE_S if timeout is None else min(timeout, self.IDLE_SLICE_S))
            return []
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return [self._reply(ref) for ref in ready]

    def _reply(self, ref: Any) -> RpcReply:
        import ray
        from ray.exceptions import RayActorError

        with self._lock:
            rank, call_id = self._in_flight.pop(ref)
        try:
            return reply_from_wire(ray.get(ref))
        except RayActorError:
            raise WorkerDiedError(rank, None) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a result Ray could not serialise
            return RpcReply(rank, None, failure_from_exception(rank, exc), call_id)

    def close(self) -> None:
        with self._lock:
            self._in_flight.clear()
