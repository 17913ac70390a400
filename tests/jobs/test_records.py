"""The image record and shard events: one type written and read back, keys in manifest order."""

from __future__ import annotations

import json

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.jobs.records import (
    ABSENT,
    ImageRecord,
    ShardEvent,
    describe,
    events_from_json,
    shard_events,
    with_shard_events,
)
from spmd_diffusion.request import OmniDiffusionRequest


def _output(**settings) -> DiffusionOutput:
    return DiffusionOutput(
        request_ids=["a"],
        images=[[]],
        seeds=[[7, 8]],
        metadata=[{"num_inference_steps": 3, "guidance_scale": 5.0, "seconds": 1.0, **settings}],
        rank=1,
    )


def test_a_record_says_what_the_worker_used_over_what_was_asked():
    request = OmniDiffusionRequest(prompt="p", request_id="a", seed=7, num_images_per_prompt=2)
    described = describe(request, "m", "f" * 16, {"k": 1})
    record = ImageRecord.made("a", 1, described, _output(scheduler="DDIM"), 0)
    assert (record.seed, record.num_inference_steps, record.scheduler) == (8, 3, "DDIM")
    assert record.true_cfg_scale is ABSENT and "true_cfg_scale" not in record.info()
    assert list(record.info()) == [
        "id", "index", "prompt", "negative_prompt", "seed", "num_inference_steps",
        "guidance_scale", "height", "width", "scheduler", "model", "fingerprint", "meta",
    ]  # fmt: skip
    ignored = ImageRecord.made("a", 0, described, _output(true_cfg_scale=None), 0)
    assert "true_cfg_scale" in ignored.info() and ignored.info()["true_cfg_scale"] is None


def test_a_manifest_line_reads_back_as_the_record_it_was():
    record = ImageRecord(
        "a", 0, prompt="p", image="/in.png", strength=0.5, fingerprint="f", meta={"k": 1},
        status="pending",
        seconds=0.5, rank=1,
    )  # fmt: skip
    record.wrote(
        {"index": 0, "path": "shards/s.tar", "key": "a", "member": "a.png", "sha256": "h",
         "bytes": 3, "written_by": 1}
    )  # fmt: skip
    record.status, record.shard_bytes = "ok", 10240
    line = json.loads(json.dumps(record.to_json()))
    assert list(line)[-15:] == [
        "image", "strength", "scheduler", "model", "fingerprint", "path", "status", "error",
        "seconds", "rank", "meta", "key", "member", "sha256", "bytes", "written_by", "shard_bytes",
    ][-15:]  # fmt: skip
    assert ImageRecord.from_json(line) == record
    brief = ImageRecord.from_json(line, brief=True)
    assert (brief.path, brief.shard_bytes, brief.prompt) == ("shards/s.tar", 10240, None)


def test_shard_events_travel_in_an_outputs_notes():
    events = [ShardEvent("shards/a.tar", bytes=10, images=2), ShardEvent("shards/b.tar", error="x")]
    output = with_shard_events(_output(), events)
    assert output.notes["shards"] == {
        "closed": [{"path": "shards/a.tar", "bytes": 10, "images": 2}],
        "failed": [{"path": "shards/b.tar", "error": "x"}],
    }
    assert shard_events(output) == events == events_from_json(output.notes["shards"])
    assert shard_events(DiffusionOutput.from_dict(output.to_dict())) == events
    assert shard_events(DiffusionOutput(request_ids=[], images=[])) == []
    assert "notes" not in _output().to_dict()  # empty: the dict every earlier reader knows
