"""The one packing rule: chunks of a list, of a stream, counted, and a worker's image batches."""

from __future__ import annotations

import random

from spmd_diffusion.engine.batching import chunk_requests, iter_chunks
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.packing import Packer, pack
from spmd_diffusion.worker.batching import plan_batches


def test_a_chunk_closes_when_full_or_when_the_next_item_does_not_fit():
    packer: Packer[str] = Packer(4)
    assert packer.add("k", 3, "a") == []
    assert packer.add("k", 2, "b") == [["a"]]  # does not fit: a closes, b opens the next
    assert packer.add("j", 5, "big") == [["big"]]  # more than the capacity: a chunk of its own
    assert packer.add("k", 2, "c") == [["b", "c"]]  # full: closed at once
    assert packer.add("k", 1, "d") == []
    assert packer.chunks == 4 and packer.close() == [("k", ["d"])]


def test_pack_groups_by_key_in_the_order_keys_are_first_seen():
    items = [("x", 1), ("y", 1), ("x", 1), ("x", 1), ("y", 1)]
    chunks = pack(items, 2, key_of=lambda item: item[0], size_of=lambda item: item[1])
    assert [[key for key, _ in chunk] for chunk in chunks] == [["x", "x"], ["x"], ["y", "y"]]


def test_list_stream_and_count_cut_the_same_chunks():
    rng = random.Random(5)
    requests = [
        OmniDiffusionRequest(
            prompt="p",
            request_id=str(i),
            num_inference_steps=rng.choice([1, 2]),
            num_images_per_prompt=rng.choice([1, 3]),
        )
        for i in range(100)
    ]
    for max_images in (1, 2, 4):
        listed = chunk_requests(requests, max_images)
        assert sorted(
            [r.request_id for r in chunk] for chunk in iter_chunks(requests, max_images)
        ) == sorted([r.request_id for r in chunk] for chunk in listed)
        counter: Packer[None] = Packer(max_images)
        for request in requests:
            counter.add(request.batch_key(), request.num_images_per_prompt)
        assert counter.chunks == len(listed)


def test_a_worker_cuts_each_shapes_images_into_slices_of_the_cap():
    requests = [
        OmniDiffusionRequest(prompt="p", request_id="a", seed=1, num_images_per_prompt=3),
        OmniDiffusionRequest(prompt="p", request_id="b", seed=2, num_inference_steps=2),
        OmniDiffusionRequest(prompt="p", request_id="c", seed=3, num_images_per_prompt=2),
        OmniDiffusionRequest(prompt="p", request_id="d", seed=4),
    ]
    batches = plan_batches(requests, 2, keys=[None, None, None, False])
    assert [[(job.request_pos, job.index) for job in batch] for batch in batches] == [
        [(0, 0), (0, 1)],
        [(0, 2), (2, 0)],
        [(2, 1)],
        [(1, 0)],
    ]
