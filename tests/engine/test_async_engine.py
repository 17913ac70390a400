"""AsyncDiffusionEngine: concurrent callers, dynamic batching by shape, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest
from gates import HoldForSignal
from helpers import same_pixels, small_requests

from spmd_diffusion import OmniDiffusionConfig, OmniDiffusionRequest
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine, Waiting
from spmd_diffusion.engine.hooks import EngineHooks
from spmd_diffusion.engine.policies import ShapePolicy


def waiting(request_id: str, queued_at: float, steps: int = 4, images: int = 1) -> Waiting:
    request = OmniDiffusionRequest(
        prompt=request_id,
        request_id=request_id,
        seed=1,
        num_inference_steps=steps,
        num_images_per_prompt=images,
    )
    return Waiting(request, None, None, queued_at)  # type: ignore[arg-type]


def test_batches_follow_the_oldest_requests_shape_up_to_the_limit():
    queue = [
        waiting("a", 0.0),
        waiting("b", 0.1, steps=8),
        waiting("c", 0.2),
        waiting("d", 0.3, images=2),
        waiting("e", 0.4),
    ]
    plan = ShapePolicy().select(queue, 3, 0.0, 1.0)
    assert [item.request.request_id for item in plan.batch] == [
        "a",
        "c",
    ]  # d (2 images) would overflow
    plan = ShapePolicy().select(queue[1:], 3, 0.0, 1.0)
    assert [item.request.request_id for item in plan.batch] == ["b"]


def test_a_partial_batch_waits_for_company_until_its_deadline():
    queue = [waiting("a", 10.0), waiting("b", 10.001)]
    held = ShapePolicy().select(queue, 4, 0.005, 10.002)
    assert held.batch == [] and held.wake_at == pytest.approx(10.005)
    ready = ShapePolicy().select(queue, 4, 0.005, 10.006)
    assert [item.request.request_id for item in ready.batch] == ["a", "b"]
    full = ShapePolicy().select(queue, 2, 10.0, 10.002)
    assert len(full.batch) == 2  # a full batch never waits


@pytest.fixture(scope="module")
def uni_engine(tiny_unet):
    engine = AsyncDiffusionEngine(OmniDiffusionConfig(executor_class="uni", max_batch_size=4), 0.05)
    yield engine
    engine.close_sync()


@pytest.mark.slow
def test_concurrent_callers_get_their_own_images_batched_by_shape(uni_engine):
    requests = small_requests(6)
    odd = small_requests(1, num_inference_steps=2)[0]
    odd.request_id = "odd"

    async def run():
        events = []

        async def one(request):
            async for event in uni_engine.generate_events(request):
                events.append(event)
            return events[-1]["output"]

        outputs = await asyncio.gather(*(one(request) for request in [*requests, odd]))
        return outputs, events

    outputs, events = asyncio.run(run())
    assert [output.request_id for output in outputs] == [r.request_id for r in requests] + ["odd"]
    assert all(output.ok for output in outputs)
    sizes = {
        event["request_id"]: event["batch_size"] for event in events if event["event"] == "started"
    }
    assert sizes["odd"] == 1  # another shape: its own batch
    assert (
        max(sizes[r.request_id] for r in requests) == 4
    )  # the six same-shape requests shared batches
    # the same items through the sync engine's fixed batches give the same pixels where batches
    # match
    reference = uni_engine.engine.generate(requests[:4])
    assert same_pixels(reference, outputs[:4])


@pytest.mark.slow
def test_a_cancelled_request_that_has_not_started_is_dropped(uni_engine):
    async def run():
        long = OmniDiffusionRequest(
            prompt="long", request_id="long", seed=1, num_inference_steps=60, height=64, width=64
        )
        before = (await uni_engine.collective_rpc("get_cache_stats"))[0]["images_generated"]
        events = uni_engine.generate_events(long)
        while (await events.__anext__())["event"] != "started":
            pass  # the long batch holds the only replica from here on
        waiting_task = asyncio.create_task(uni_engine.generate(small_requests(1)[0]))
        while uni_engine.queued == 0:
            await asyncio.sleep(0.01)
        waiting_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_task
        assert uni_engine.queued == 0
        async for event in events:
            last = event
        assert last["event"] == "done" and last["output"].ok
        after = (await uni_engine.collective_rpc("get_cache_stats"))[0]["images_generated"]
        return before, after

    before, after = asyncio.run(run())
    assert after == before + 1  # the long request's image, never the cancelled one


def stop_after_first_step(
    engine: AsyncDiffusionEngine, request: OmniDiffusionRequest
) -> list[dict]:
    """Follow ``request`` until its first step event, then leave (which cancels it)."""

    async def run():
        seen = []
        async for event in engine.generate_events(request):
            seen.append(event)
            if event["event"] == "step":
                break
        return seen

    return asyncio.run(run())


class Steps(EngineHooks):
    """Counts denoising steps and cancellations, as the scheduler reports them."""

    def __init__(self) -> None:
        self.steps, self.cancelled = 0, []

    def denoising_step(self, batch, step, seconds):
        self.steps += 1

    def request_cancelled(self, request_id, latency_s):
        self.cancelled.append(request_id)


@pytest.mark.slow
def test_a_started_request_that_is_cancelled_stops_between_steps_and_the_engine_goes_on(tiny_unet):
    steps = Steps()
    engine = AsyncDiffusionEngine(OmniDiffusionConfig(executor_class="uni"), 0.0, hooks=[steps])
    try:
        request = OmniDiffusionRequest(
            prompt="x", request_id="started", seed=3, num_inference_steps=40, height=64, width=64
        )
        with HoldForSignal(at_step=2):
            seen = stop_after_first_step(engine, request)
            wait_until(lambda: steps.cancelled == ["started"])
        assert [event["event"] for event in seen] == ["queued", "started", "step"]
        assert seen[-1]["step"] == 1 and seen[-1]["steps"] == 40
        # held after step 2 until the signal came: it stopped there, or after step 1 where the
        # signal beat the leader's own check of that step (a loaded machine)
        assert 1 <= steps.steps <= 2 and engine.signals_sent == 1
        assert asyncio.run(engine.generate(small_requests(1)[0])).ok
    finally:
        engine.close_sync()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2], ids=["mp", "mp-tp2"])
def test_spawned_workers_stop_a_cancelled_request_between_steps(tiny_unet, monkeypatch, tp):
    """The same over the mp executor's pipes (and under tp=2, both ranks of the replica leave
    the loop at the same step)."""
    for name, value in HoldForSignal(at_step=2).env().items():
        if name in ("PYTHONPATH", "SPMD_TEST_HOLD_FOR_SIGNAL_AT"):
            monkeypatch.setenv(name, value)  # inherited by the spawned workers
    steps = Steps()
    config = OmniDiffusionConfig(executor_class="mp", num_gpus=tp, tensor_parallel_size=tp)
    engine = AsyncDiffusionEngine(config, 0.0, hooks=[steps])
    try:
        request = OmniDiffusionRequest(
            prompt="x", request_id="spawned", seed=3, num_inference_steps=40, height=32, width=32
        )
        seen = stop_after_first_step(engine, request)
        wait_until(lambda: steps.cancelled == ["spawned"])
        assert seen[-1]["event"] == "step" and 1 <= steps.steps <= 2  # of 40 (see above)
        assert asyncio.run(engine.generate(small_requests(1, num_inference_steps=2)[0])).ok
    finally:
        engine.close_sync()


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true"
        time.sleep(0.01)


@pytest.mark.slow
def test_bad_requests_fail_their_caller_only(uni_engine):
    async def run():
        bad = OmniDiffusionRequest(prompt="x", request_id="bad", height=8192)
        with pytest.raises(ValueError, match="above the limit"):
            await uni_engine.generate(bad)
        return await uni_engine.generate(small_requests(1)[0])

    assert asyncio.run(run()).ok


@pytest.mark.slow
def test_close_refuses_what_waits(tiny_unet):
    engine = AsyncDiffusionEngine(OmniDiffusionConfig(executor_class="uni"))

    async def run():
        await engine.close()
        with pytest.raises(Exception, match="closed"):
            await engine.generate(small_requests(1)[0])

    asyncio.run(run())  # returns: close does not wait on anything (pytest-timeout catches a hang)
