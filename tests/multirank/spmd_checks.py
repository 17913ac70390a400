"""Checks shared by the MPI and torchrun multi-rank test modules (imported into both)."""

from __future__ import annotations

import os

import pytest
from helpers import hammer_from_two_threads, same_pixels, small_requests

from spmd_diffusion.errors import WorkerError
from spmd_diffusion.executor import UniProcDiffusionExecutor


def test_rpc_reaches_every_rank(root_engine):
    answers = root_engine.collective_rpc(lambda worker: (worker.rank, os.getpid()))
    assert [rank for rank, _ in answers] == [0, 1]
    assert len({pid for _, pid in answers}) == 2
    assert root_engine.collective_rpc("ping") == [0, 1]


def test_unique_reply_rank(root_engine):
    assert root_engine.collective_rpc("ping", unique_reply_rank=1) == 1
    assert root_engine.collective_rpc(lambda worker: worker.rank * 10, unique_reply_rank=0) == 0
    with pytest.raises(ValueError, match="outside"):
        root_engine.collective_rpc("ping", unique_reply_rank=2)


def test_callables_with_arguments(root_engine):
    def scaled(worker, factor, offset=0):
        return worker.rank * factor + offset

    assert root_engine.collective_rpc(scaled, args=(5,), kwargs={"offset": 1}) == [1, 6]


def test_worker_exception_on_rank_1_is_one_typed_error(root_engine):
    def fail_on_rank_1(worker):
        if worker.rank == 1:
            raise FileNotFoundError("no such shard")
        return "fine"

    with pytest.raises(WorkerError) as caught:
        root_engine.collective_rpc(fail_on_rank_1)
    assert caught.value.ranks == [1] and caught.value.exc_types == ["FileNotFoundError"]
    assert "no such shard" in str(caught.value) and "fail_on_rank_1" in str(caught.value)
    assert root_engine.collective_rpc("ping") == [0, 1]  # the job goes on


def test_large_replies(root_engine):
    blob = root_engine.collective_rpc(
        lambda worker: bytes([worker.rank]) * (12 << 20), unique_reply_rank=1
    )
    assert len(blob) == 12 << 20 and blob[:1] == b"\x01"


def test_generate_matches_the_uni_executor(root_engine):

    requests = small_requests(3)
    outputs = root_engine.generate(requests)
    assert all(output.ok for output in outputs)
    reference = UniProcDiffusionExecutor(root_engine.od_config)
    try:
        expected = reference.execute_model(requests).split()
    finally:
        reference.shutdown()
    assert same_pixels(expected, outputs)


def test_sleep_and_wake_on_every_rank(root_engine):
    root_engine.sleep(1)
    assert [h["status"] for h in root_engine.collective_rpc("check_health")] == ["asleep", "asleep"]
    root_engine.wake_up(["weights"])
    root_engine.check_health()


def test_two_threads_each_get_their_own_results(root_engine):

    assert hammer_from_two_threads(root_engine, rounds=50) == []
