"""Monitoring hooks (order, isolation, loading, trace file) and schedule policies."""

from __future__ import annotations

import json

import pytest
from helpers import same_pixels, small_requests

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest
from spmd_diffusion.engine.hooks import BatchInfo, EngineHooks, HookList, check_hook_spec, load_hook
from spmd_diffusion.engine.policies import (
    CostAwarePolicy,
    FifoPolicy,
    ShapePolicy,
    request_cost,
    resolve_policy,
)
from spmd_diffusion.engine.trace_hooks import TraceHooks


class Recorder(EngineHooks):
    """Every event, as (name, request ids)."""

    events: list[tuple[str, tuple[str, ...]]] = []

    def request_queued(self, request_id, images, at):
        self.events.append(("queued", (request_id,)))

    def batch_started(self, batch):
        self.events.append(("batch_started", batch.request_ids))

    def denoising_step(self, batch, step, seconds):
        assert seconds >= 0
        self.events.append((f"step{step}", batch.request_ids))

    def batch_finished(self, batch, seconds, failed):
        self.events.append(("batch_finished", batch.request_ids))

    def request_done(self, request_id, images, queue_s, latency_s):
        assert 0 <= queue_s <= latency_s and images == 1
        self.events.append(("done", (request_id,)))

    def request_failed(self, request_id, error, latency_s):
        self.events.append(("failed", (request_id,)))


class Broken(EngineHooks):
    def batch_started(self, batch):
        raise RuntimeError("an observer with a bug")


@pytest.mark.slow
def test_hooks_see_every_event_in_order_and_a_broken_hook_loses_nothing(tiny_unet):
    Recorder.events = []
    config = OmniDiffusionConfig(
        executor_class="uni", max_batch_size=1, hooks=["test_hooks_and_policies.Recorder"]
    )
    requests = small_requests(2, num_inference_steps=3)
    with DiffusionEngine(config, hooks=[Broken()]) as engine:
        outputs = engine.generate(requests)
    assert all(output.ok for output in outputs)
    ids = ("item-0",), ("item-1",)
    expected = [("queued", ids[0]), ("queued", ids[1])]
    for one in ids:
        expected += [
            ("batch_started", one),
            ("step0", one),
            ("step1", one),
            ("step2", one),
            ("batch_finished", one),
            ("done", one),
        ]
    assert Recorder.events == expected


def test_failed_requests_are_reported_as_failed(tiny_unet):
    Recorder.events = []
    bad = OmniDiffusionRequest(
        prompt="x",
        request_id="bad",
        seed=1,
        num_inference_steps=1,
        height=32,
        width=32,
        extra={"no_such_argument": 1},
    )
    with DiffusionEngine(OmniDiffusionConfig(executor_class="uni"), hooks=[Recorder()]) as engine:
        (output,) = engine.generate([bad])
    assert not output.ok and Recorder.events[-1] == ("failed", ("bad",))


def test_hook_names_resolve_or_fail_clearly(tmp_path):
    assert type(load_hook("prometheus")).__name__ == "PrometheusHooks"
    trace = load_hook(f"trace:{tmp_path / 't.jsonl'}")
    assert isinstance(trace, TraceHooks)
    trace.close()
    assert isinstance(load_hook("test_hooks_and_policies:Recorder"), Recorder)
    for spec, message in (
        ("trace", "needs a file"),
        ("no_such_module.Hook", "cannot load hook"),
        ("nodots", "not a dotted path"),
    ):
        with pytest.raises(ValueError, match=message):
            check_hook_spec(spec) if spec != "trace" else load_hook(spec)
        with pytest.raises(ValueError, match=message):
            load_hook(spec)
    with pytest.raises(ValueError, match="not EngineHooks"):
        load_hook("json.JSONDecoder")
    assert not HookList() and HookList([Recorder()])


def test_the_trace_file_is_json_lines_in_event_order(tmp_path):

    trace = TraceHooks(tmp_path / "trace.jsonl", steps=True)
    batch = BatchInfo(1, 0, ("a",), 1, 0.0, (0.0,))
    trace.request_queued("a", 1, 0.0)
    trace.batch_started(batch)
    trace.denoising_step(batch, 0, 0.01)
    trace.batch_finished(batch, 0.02, 0)
    trace.request_done("a", 1, 0.0, 0.02)
    trace.close()
    lines = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == [
        "request_queued",
        "batch_started",
        "denoising_step",
        "batch_finished",
        "request_done",
    ]
    trace.request_done("late", 1, 0, 0)  # after close: dropped, never an error


def request(
    request_id: str, steps: int = 4, side: int = 64, images: int = 1
) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(
        prompt=request_id,
        request_id=request_id,
        seed=1,
        num_inference_steps=steps,
        height=side,
        width=side,
        num_images_per_prompt=images,
    )


class Item:
    def __init__(self, request: OmniDiffusionRequest, queued_at: float) -> None:
        self.request, self.queued_at = request, queued_at


def test_batch_job_orders():
    batches = [
        [request("a", steps=4)],
        [request("b", steps=40)],
        [request("c", steps=4)],
        [request("d", side=128)],
    ]
    assert FifoPolicy().order(batches) == [0, 1, 2, 3]
    assert ShapePolicy().order(batches) == [0, 2, 1, 3]  # the first shape's batches together
    assert CostAwarePolicy().order(batches) == [
        1,
        3,
        0,
        2,
    ]  # 40 steps x 64^2 > 4 x 128^2 > the rest
    assert request_cost(request("x", steps=10, side=64, images=2)) == 10 * 64 * 64 * 2
    assert request_cost(OmniDiffusionRequest(prompt="defaults")) == 50 * 512 * 512


def test_server_selection_by_policy():
    queue = [Item(request("a"), 0.0), Item(request("b", steps=40), 0.1), Item(request("c"), 0.2)]
    assert [i.request.request_id for i in ShapePolicy().select(queue, 4, 0.0, 1.0).batch] == [
        "a",
        "c",
    ]
    assert [i.request.request_id for i in FifoPolicy().select(queue, 4, 0.0, 1.0).batch] == ["a"]
    assert [i.request.request_id for i in CostAwarePolicy().select(queue, 4, 0.0, 1.0).batch] == [
        "b"
    ]
    # fifo does not hold a partial batch back when another shape waits behind it
    assert FifoPolicy().select(queue, 4, 10.0, 0.0).batch
    held = CostAwarePolicy().select(queue, 4, 5.0, 1.0)
    assert not held.batch and held.wake_at == pytest.approx(5.0)
    assert ShapePolicy().select([], 4, 0.0, 0.0).wake_at is None


def test_policies_resolve_by_name_or_path():
    assert isinstance(resolve_policy("cost"), CostAwarePolicy) and isinstance(
        resolve_policy(None), ShapePolicy
    )
    assert isinstance(resolve_policy("spmd_diffusion.engine.policies:FifoPolicy"), FifoPolicy)
    for spec, message in (
        ("random", "unknown schedule"),
        ("json:dumps", "lacks order"),
        ("no.such:Policy", "cannot load schedule"),
    ):
        with pytest.raises(ValueError, match=message):
            resolve_policy(spec)


@pytest.mark.slow
def test_every_policy_gives_the_same_pixels(tiny_unet):
    requests = [*small_requests(3), *small_requests(2, num_inference_steps=2)]
    for number, item in enumerate(requests):
        item.request_id = f"r{number}"
    results = {}
    for name in ("fifo", "shape", "cost"):
        with DiffusionEngine(
            OmniDiffusionConfig(executor_class="uni", max_batch_size=2, schedule=name)
        ) as engine:
            results[name] = engine.generate(requests)

    assert same_pixels(results["fifo"], results["shape"]) and same_pixels(
        results["fifo"], results["cost"]
    )
