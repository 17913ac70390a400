"""The one message vocabulary every transport carries.

The engine sends :class:`RpcRequest` (``kind``, ``call_id``, ``method``, ``args``,
``kwargs``, ``reply_rank`` -- vLLM's RPC tuple plus an id) and every rank answers with one
:class:`RpcReply`. Pipes, sockets, MPI and gloo all move these same two tuples, and one
serve loop (:mod:`.serve_loop`) answers them, so a call runs and fails the same way under
every executor.

Both are NamedTuples. Across a process boundary they travel as plain tuples (the kind as an
int): pickling NamedTuples with an IntEnum costs about as much as the raw MPI round trip
itself, plain tuples a tenth of it (benchmarks/RESULTS.md, "Measurements behind design
choices").
They only ever travel over channels that the job itself opened (a pipe to its own child,
the launcher's MPI or gloo group, or a socket authenticated with a shared key).
"""

from __future__ import annotations

import enum
import functools
import traceback
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

from spmd_diffusion.data import StepNote  # noqa: F401 - travels as a reply's value (see RpcExecutor._route)
from spmd_diffusion.errors import RankFailure, WorkerError

RpcMethod = str | Callable[..., Any]


class MessageKind(enum.IntEnum):
    """What a request asks of a worker."""

    CALL = 1  # run ``method`` on the worker; every rank replies
    START = 2  # load the worker: args = (od_config, placement, rendezvous)
    SHUTDOWN = 3  # stop serving and release the worker (acknowledged)
    DISCONNECT = 4  # the caller leaves; an external worker keeps serving (acknowledged)
    ABORT = 5  # before START: exit with code args[0] (rank 0 failed before start-up)
    SIGNAL = 6  # to a busy replica leader, read between steps: args[0] a plain dict; never answered


class RpcRequest(NamedTuple):
    """One message from the engine to one rank."""

    kind: MessageKind
    call_id: int = 0
    method: Any = None  # a worker method name, or a callable wrapped in ByValue
    args: tuple = ()
    kwargs: dict[str, Any] | None = None
    reply_rank: int | None = None  # only this rank ships its value; the others acknowledge


class RpcReply(NamedTuple):
    """One rank's answer: a value, or the failure that replaced it."""

    rank: int
    value: Any = None
    failure: RankFailure | None = None
    call_id: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None


_KINDS = {kind.value: kind for kind in MessageKind}


def request_to_wire(request: RpcRequest) -> tuple:
    return (request.kind.value, *request[1:])


def request_from_wire(data: tuple) -> RpcRequest:
    return RpcRequest(_KINDS[data[0]], *data[1:])


def reply_to_wire(reply: RpcReply) -> tuple:
    return tuple(reply)


def reply_from_wire(data: tuple) -> RpcReply:
    return RpcReply._make(data)


class WireEndpoint:
    """A worker's end of a pickling channel (pipe, socket, control plane): requests and
    replies cross it as plain tuples."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def recv(self) -> RpcRequest:
        return request_from_wire(self.channel.recv())

    def send(self, reply: RpcReply) -> None:
        self.channel.send(reply_to_wire(reply))

    def poll_request(self) -> RpcRequest | None:
        """The next request if one is waiting (None at once otherwise, or where the channel
        cannot tell without waiting)."""
        poll = getattr(self.channel, "poll", None)
        if poll is None or not poll(0):
            return None
        return self.recv()


@functools.lru_cache(maxsize=64)
def load_by_value(payload: bytes) -> Callable[..., Any]:
    """Unpickle a shipped callable; the same callable sent again is not rebuilt."""
    return cloudpickle.loads(payload)


_PAYLOADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ByValue:
    """Wraps a callable so plain pickle ships it by value (lambdas, closures, local defs).

    Unpickling yields the callable itself, so receivers need no special case; a ByValue
    that never crossed a process (rank 0's own worker thread) calls through to it. A
    callable sent repeatedly is pickled once (its payload is cached while the callable lives).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        try:
            payload = _PAYLOADS.get(fn)
        except TypeError:  # not weak-referenceable
            payload = None
        if payload is None:
            payload = cloudpickle.dumps(fn)
            try:
                _PAYLOADS[fn] = payload
            except TypeError:
                pass
        self.payload = payload

    def __reduce__(self):
        return (load_by_value, (self.payload,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return load_by_value(self.payload)(*args, **kwargs)


def portable_method(method: RpcMethod) -> Any:
    """A method name stays a string; a callable is wrapped to travel by value."""
    if isinstance(method, str):
        return method
    if callable(method):
        return ByValue(method)
    raise TypeError(
        f"method must be a worker method name or a callable, got {type(method).__name__}"
    )


def method_name(method: Any) -> str:
    if isinstance(method, str):
        return method
    return (
        getattr(method, "__qualname__", None) or getattr(method, "__name__", None) or repr(method)
    )


def failure_from_exception(rank: int, exc: BaseException) -> RankFailure:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RankFailure(rank=rank, exc_type=type(exc).__name__, message=str(exc), traceback=text)


def resolve_method(worker: Any, method: Any) -> Callable[..., Any]:
    """A public worker method by name, or a callable that takes the worker first."""
    if isinstance(method, str):
        target = getattr(worker, method, None) if not method.startswith("_") else None
        if target is None or not callable(target):
            raise AttributeError(f"{type(worker).__name__} has no RPC method {method!r}")
        return target
    return lambda *args, **kwargs: method(worker, *args, **kwargs)


def run_rpc(
    worker: Any, rank: int, method: Any, args: tuple, kwargs: dict | None, call_id: int = 0
) -> RpcReply:
    """Run one call on this rank's worker; an exception becomes a failure, never a crash."""
    try:
        value = resolve_method(worker, method)(*args, **(kwargs or {}))
        return RpcReply(rank, value, None, call_id)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the caller
        return RpcReply(rank, None, failure_from_exception(rank, exc), call_id)


def answer(worker: Any, rank: int, request: RpcRequest) -> RpcReply:
    """Run a CALL request; only ``reply_rank`` (or every rank, if None) ships its value."""
    reply = run_rpc(worker, rank, request.method, request.args, request.kwargs, request.call_id)
    if reply.ok and request.reply_rank is not None and request.reply_rank != rank:
        return reply._replace(value=None)
    return reply


def collect_replies(method: Any, replies: list[RpcReply], unique_reply_rank: int | None) -> Any:
    """Raise one WorkerError for all failed ranks, else return the values (or the one asked for)."""
    failures = [reply.failure for reply in replies if reply.failure is not None]
    if failures:
        raise WorkerError(method_name(method), failures)
    if unique_reply_rank is not None:
        for reply in replies:
            if reply.rank == unique_reply_rank:
                return reply.value
        raise ValueError(f"no reply from rank {unique_reply_rank}")
    return [reply.value for reply in sorted(replies, key=lambda r: r.rank)]
