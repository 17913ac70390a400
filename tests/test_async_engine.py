"""AsyncDiffusionEngine: concurrent callers, dynamic batching by shape, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from helpers import same_pixels, small_requests

from spmd_diffusion import OmniDiffusionConfig, OmniDiffusionRequest
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine, Waiting
from spmd_diffusion.engine.policies import ShapePolicy


def waiting(request_id: str, queued_at: float, steps: int = 4, images: int = 1) -> Waiting:
    request = OmniDiffusionRequest(prompt=request_id, request_id=request_id, seed=1, num_inference_steps=steps,
                                   num_images_per_prompt=images)
    return Waiting(request, None, None, queued_at)  # type: ignore[arg-type]


def test_batches_follow_the_oldest_requests_shape_up_to_the_limit():
    queue = [waiting("a", 0.0), waiting("b", 0.1, steps=8), waiting("c", 0.2), waiting("d", 0.3, images=2),
             waiting("e", 0.4)]
    plan = ShapePolicy().select(queue, 3, 0.0, 1.0)
    assert [item.request.request_id for item in plan.batch] == ["a", "c"]  # d (2 images) would overflow
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
    sizes = {event["request_id"]: event["batch_size"] for event in events if event["event"] == "started"}
    assert sizes["odd"] == 1  # another shape: its own batch
    assert max(sizes[r.request_id] for r in requests) == 4  # the six same-shape requests shared batches
    # the same items through the sync engine's fixed batches give the same pixels where batches match
    reference = uni_engine.engine.generate(requests[:4])
    assert same_pixels(reference, outputs[:4])


@pytest.mark.slow
def test_a_cancelled_request_that_has_not_started_is_dropped(uni_engine):
    async def run():
        long = OmniDiffusionRequest(prompt="long", request_id="long", seed=1, num_inference_steps=60, height=64,
                                    width=64)
        before = (await uni_engine.collective_rpc("get_cache_stats"))[0]["images_generated"]
        first = asyncio.create_task(uni_engine.generate(long))
        await asyncio.sleep(0.3)  # the long batch has started on the only replica
        waiting_task = asyncio.create_task(uni_engine.generate(small_requests(1)[0]))
        await asyncio.sleep(0.05)
        waiting_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_task
        assert (await first).ok
        await asyncio.sleep(0.2)
        after = (await uni_engine.collective_rpc("get_cache_stats"))[0]["images_generated"]
        return before, after

    before, after = asyncio.run(run())
    assert after == before + 1  # the long request's image, never the cancelled one


@pytest.mark.slow
def test_a_started_request_that_is_cancelled_finishes_and_the_engine_goes_on(uni_engine):
    async def run():
        request = OmniDiffusionRequest(prompt="x", request_id="started", seed=3, num_inference_steps=40, height=64,
                                       width=64)
        task = asyncio.create_task(uni_engine.generate(request))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (after,) = await asyncio.gather(uni_engine.generate(small_requests(1)[0]))
        return after

    assert asyncio.run(run()).ok


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
