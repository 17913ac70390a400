"""The RPC envelope and the shared-memory channel."""

from __future__ import annotations

import multiprocessing
import pickle
import time

import pytest

from spmd_diffusion.distributed.control.base import (
    SLOT_BYTES,
    Backoff,
    encode_slot,
    slot_length,
    slot_payload,
)
from spmd_diffusion.distributed.protocol import (
    ByValue,
    RpcReply,
    collect_replies,
    portable_method,
    run_rpc,
)
from spmd_diffusion.distributed.shm_channel import ShmChannel
from spmd_diffusion.errors import ExecutorTimeoutError, RankFailure, WorkerDiedError, WorkerError


class FakeWorker:
    rank = 3

    def echo(self, value, times=1):
        return value * times

    def _private(self):
        return "secret"


def test_run_rpc_by_name_and_callable():
    worker = FakeWorker()
    assert run_rpc(worker, 3, "echo", ("ab",), {"times": 2}).value == "abab"
    assert run_rpc(worker, 3, lambda w, x: w.rank + x, (1,), None).value == 4


def test_run_rpc_turns_exceptions_into_failures():
    reply = run_rpc(FakeWorker(), 3, "missing", (), None)
    assert (
        not reply.ok
        and reply.failure.exc_type == "AttributeError"
        and "missing" in reply.failure.message
    )
    assert not run_rpc(FakeWorker(), 3, "_private", (), None).ok
    reply = run_rpc(FakeWorker(), 3, lambda w: 1 / 0, (), None)
    assert reply.failure.rank == 3 and "ZeroDivisionError" in reply.failure.traceback


def test_callables_travel_by_value_through_plain_pickle():
    offset = 10
    shipped = pickle.loads(pickle.dumps(portable_method(lambda w: w.rank + offset)))
    assert shipped(FakeWorker()) == 13
    assert portable_method("echo") == "echo"
    assert isinstance(portable_method(print), ByValue)
    with pytest.raises(TypeError):
        portable_method(3)


def test_collect_replies_values_reply_rank_and_errors():
    replies = [RpcReply(rank=1, value="b"), RpcReply(rank=0, value="a")]
    assert collect_replies("m", replies, None) == ["a", "b"]
    assert collect_replies("m", replies, 1) == "b"
    failure = RankFailure(rank=1, exc_type="KeyError", message="'k'", traceback="Traceback ...")
    with pytest.raises(WorkerError) as caught:
        collect_replies("m", [RpcReply(rank=0, value=1), RpcReply(rank=1, failure=failure)], 0)
    assert caught.value.ranks == [1] and caught.value.exc_types == ["KeyError"]
    assert "rank 1: KeyError" in str(caught.value) and "Traceback" in str(caught.value)


def test_typed_errors_pickle_with_their_fields():
    failure = RankFailure(1, "ValueError", "bad", "tb")
    for error in (
        WorkerError("generate", [failure]),
        ExecutorTimeoutError("m", 1.5, [1]),
        WorkerDiedError(2, -9, "m"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)


def _echo_child(channel: ShmChannel) -> None:
    channel.send(channel.recv())


@pytest.mark.parametrize("size", [100, 3 << 20])
def test_shm_channel_small_inline_large_through_shared_memory(size):
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=_echo_child, args=(ShmChannel(child_end),))
    child.start()
    channel = ShmChannel(parent_end)
    payload = {"blob": bytes(range(256)) * (size // 256)}
    channel.send(payload)
    assert channel.recv() == payload
    child.join(10)
    assert child.exitcode == 0


def test_slot_encoding_inline_and_overflow():

    slot, rest = encode_slot(("call", 1, "ping"))
    assert rest is None and len(slot) == SLOT_BYTES
    assert pickle.loads(slot_payload(slot)) == ("call", 1, "ping")
    big = {"blob": b"x" * (SLOT_BYTES * 3)}
    reused = bytearray(SLOT_BYTES)
    slot, rest = encode_slot(big, reused)
    assert slot is reused and slot_payload(slot) is None
    assert slot_length(slot) == len(rest) and pickle.loads(rest) == big


def test_backoff_spins_then_sleeps_and_honours_the_deadline():

    polls = []
    assert Backoff(spin_s=0.0, max_sleep_s=0.001).wait(lambda: polls.append(1) or len(polls) > 50)
    start = time.monotonic()
    assert not Backoff(spin_s=0.01, max_sleep_s=0.002).wait(lambda: False, deadline=start + 0.2)
    assert (
        0.2 <= time.monotonic() - start < 5.0
    )  # honours the deadline (a loaded machine may overshoot it)


def test_callables_are_pickled_once_while_they_live():
    def task(worker):
        return worker.rank

    assert portable_method(task).payload is portable_method(task).payload
