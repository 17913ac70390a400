"""The replica leader's output writer: a batch's files are written while the next batch runs,
in order, at most one batch behind (back-pressure), a failed write failing that batch alone."""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL); test-local or optional helpers
# (test_output_overlap)

from __future__ import annotations

import threading
import time

import pytest
from helpers import small_requests

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig
from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.jobs import outputs
from spmd_diffusion.worker.output_writer import OutputWriter

DENOISER_CALLS = [0]  # in the worker process: denoiser calls so far (see count_denoiser_calls)


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


class Gate:
    """A sink stand-in: ``write`` waits for ``opened`` (up to 60 s), then answers ``output``."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.opened = name, log, threading.Event()

    def write(self, output):
        self.log.append(("start", self.name))
        if not self.opened.wait(60):
            raise TimeoutError(f"{self.name} was never opened")
        self.log.append(("done", self.name))
        return output


def test_the_writer_answers_in_order_and_is_at_most_one_batch_behind():
    log: list = []
    answers: list = []
    writer = OutputWriter()
    gates = [Gate(f"b{index}", log) for index in range(3)]
    for gate in gates[:2]:
        writer.submit(
            gate, gate.name, lambda value=None, error=None: answers.append((value, error))
        )
    assert wait_until(lambda: log == [("start", "b0")])
    third = threading.Thread(
        target=writer.submit,
        args=(gates[2], "b2", lambda value=None, error=None: answers.append((value, error))),
    )
    third.start()
    time.sleep(0.2)  # a blocked submit stays blocked: nothing it waits on changes meanwhile
    assert third.is_alive(), "a third batch was taken while one was written and one waited"
    gates[0].opened.set()
    third.join(timeout=60)
    assert not third.is_alive()
    for gate in gates[1:]:
        gate.opened.set()
    writer.drain()
    assert answers == [("b0", None), ("b1", None), ("b2", None)]
    writer.close()


def test_a_failed_write_answers_its_batch_with_the_error_and_the_writer_goes_on():
    class Broken:
        def write(self, output):
            raise OSError(28, "No space left on device")

    class Fine:
        def write(self, output):
            return output + "-written"

    answers: list = []
    writer = OutputWriter()
    for sink, output in ((Broken(), "a"), (Fine(), "b")):
        writer.submit(sink, output, lambda value=None, error=None: answers.append((value, error)))
    writer.close()
    assert answers[0][0] is None and isinstance(answers[0][1], OSError)
    assert answers[1] == ("b-written", None)


class WaitsForTheNextBatch:
    """Batch 0's sink: writes only once the worker's denoiser has been called by the next
    batch (more than ``calls`` times in all); proves the next batch started meanwhile."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def write(self, output: DiffusionOutput) -> DiffusionOutput:
        if not wait_until(lambda: DENOISER_CALLS[0] > self.calls):
            raise TimeoutError("the next batch never started while this one was being written")
        return output


class PassThrough:
    def write(self, output: DiffusionOutput) -> DiffusionOutput:
        return output


def count_denoiser_calls(worker) -> bool:
    import test_output_overlap as here

    here.DENOISER_CALLS[0] = 0
    worker.denoiser.register_forward_pre_hook(
        lambda module, args: here.DENOISER_CALLS.__setitem__(0, here.DENOISER_CALLS[0] + 1)
    )
    return True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_replica_denoises_its_next_batch_while_the_last_one_is_written(tiny_unet):
    requests = small_requests(4, num_inference_steps=2, height=32, width=32)
    batches = [requests[:2], requests[2:]]
    with DiffusionEngine(
        OmniDiffusionConfig(executor_class="mp", num_gpus=1, max_batch_size=2)
    ) as engine:
        assert engine.collective_rpc(count_denoiser_calls) == [True]
        outputs: list[DiffusionOutput] = []
        # batch 0 runs 2 steps, one denoiser call each (guidance batched): its sink waits for a
        # third
        engine.generate_stream(
            batches, outputs.append, sinks=[WaitsForTheNextBatch(2), PassThrough()]
        )
    assert sorted(request_id for output in outputs for request_id in output.request_ids) == sorted(
        request.request_id for request in requests
    )
    assert all(error is None for output in outputs for error in output.errors), [
        o.errors for o in outputs
    ]


class Fails:
    def write(self, output: DiffusionOutput) -> DiffusionOutput:
        raise OSError(28, "No space left on device")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sink_that_fails_fails_its_own_batch_only(tiny_unet):
    requests = small_requests(4, num_inference_steps=2, height=32, width=32)
    with DiffusionEngine(
        OmniDiffusionConfig(executor_class="mp", num_gpus=1, max_batch_size=2)
    ) as engine:
        outputs: list[DiffusionOutput] = []
        engine.generate_stream(
            [requests[:2], requests[2:]], outputs.append, sinks=[Fails(), PassThrough()]
        )
    errors = {
        request_id: error
        for output in outputs
        for request_id, error in zip(output.request_ids, output.errors, strict=True)
    }
    assert (
        "No space left on device" in errors["item-0"]
        and "No space left on device" in errors["item-1"]
    )
    assert errors["item-2"] is None and errors["item-3"] is None


def test_a_batch_is_vouched_for_only_after_one_sync_of_its_directory(tmp_path, monkeypatch):
    """Each file's data is synced as it is written; the directory holding their new names once
    per batch, before any record leaves: if that sync fails, no file of the batch is vouched for."""
    from PIL import Image

    output = DiffusionOutput(
        request_ids=["a", "b"],
        images=[[Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))]],
        errors=[None, None],
        seeds=[[1], [2]],
        metadata=[{}, {}],
    )
    synced: list = []
    monkeypatch.setattr(outputs, "fsync_directory", synced.append)
    written = outputs.ImageFileSink(str(tmp_path), {"a": 1, "b": 1}).write(output)
    assert [len(meta["files"]) for meta in written.metadata] == [1, 1] and written.errors == [
        None,
        None,
    ]
    assert synced == [tmp_path / "images"]  # once for the batch, not once per file

    def fails(directory):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(outputs, "fsync_directory", fails)
    written = outputs.ImageFileSink(str(tmp_path / "again"), {"a": 1, "b": 1}).write(output)
    assert [meta["files"] for meta in written.metadata] == [[], []]
    assert all("Input/output error" in error for error in written.errors)
