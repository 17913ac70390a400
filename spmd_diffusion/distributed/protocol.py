"""The RPC envelope every executor uses: ``(method, args, kwargs, reply_rank)`` in,
one :class:`RpcReply` per rank out.

Keeping this in one place means every backend (in-process, spawned processes, MPI, gloo)
runs a call and reports its failure in exactly the same way.
"""

from __future__ import annotations

import functools
import traceback
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

from spmd_diffusion.errors import RankFailure, WorkerError

RpcMethod = str | Callable[..., Any]


@functools.lru_cache(maxsize=64)
def load_by_value(payload: bytes) -> Callable[..., Any]:
    """Unpickle a shipped callable; the same callable sent again is not rebuilt."""
    return cloudpickle.loads(payload)


_PAYLOADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ByValue:
    """Wraps a callable so plain pickle ships it by value (lambdas, closures, local defs).

    Unpickling yields the callable itself, so receivers need no special case. A callable
    sent repeatedly is pickled once (its payload is cached while the callable lives).
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


def portable_method(method: RpcMethod) -> Any:
    """A method name stays a string; a callable is wrapped to travel by value."""
    if isinstance(method, str):
        return method
    if callable(method):
        return ByValue(method)
    raise TypeError(f"method must be a worker method name or a callable, got {type(method).__name__}")


def method_name(method: Any) -> str:
    if isinstance(method, str):
        return method
    return getattr(method, "__qualname__", None) or getattr(method, "__name__", None) or repr(method)


class RpcReply(NamedTuple):
    """One rank's answer: a value, or the failure that replaced it (a tuple: cheap to
    build and to pickle, which matters on the microsecond RPC path)."""

    rank: int
    value: Any = None
    failure: RankFailure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


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


def run_rpc(worker: Any, rank: int, method: Any, args: tuple, kwargs: dict | None) -> RpcReply:
    """Run one call on this rank's worker; an exception becomes a failure, never a crash."""
    try:
        value = resolve_method(worker, method)(*args, **(kwargs or {}))
        return RpcReply(rank=rank, value=value)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the caller
        return RpcReply(rank=rank, failure=failure_from_exception(rank, exc))


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
    values = [reply.value for reply in replies]
    if any(reply.rank != position for position, reply in enumerate(replies)):
        values = [reply.value for reply in sorted(replies, key=lambda r: r.rank)]
    return values


def serve_channel(worker: Any, rank: int, channel: Any) -> str:
    """Answer calls arriving on ``channel`` until told to stop; returns why it stopped.

    Messages: ``("call", method, args, kwargs, reply_rank)``, ``("shutdown",)`` (stop the
    worker) and ``("disconnect",)`` (the caller leaves; an external worker keeps running).
    Only ``reply_rank`` ships its value back; the others send an empty acknowledgement.
    """
    while True:
        try:
            message = channel.recv()
        except (EOFError, OSError):
            return "eof"
        kind = message[0]
        if kind in ("shutdown", "disconnect"):
            channel.send(RpcReply(rank=rank, value=kind))
            return kind
        _, method, args, kwargs, reply_rank = message
        reply = run_rpc(worker, rank, method, args, kwargs)
        if reply.ok and reply_rank is not None and reply_rank != rank:
            reply = reply._replace(value=None)
        try:
            channel.send(reply)
        except (EOFError, OSError, BrokenPipeError):
            return "eof"
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
            channel.send(RpcReply(rank=rank, failure=failure_from_exception(rank, exc)))
