"""One work source for a batch list and a batch stream: the index a batch is handed out with
is its position in the input, whatever order the policy hands it out in."""

from __future__ import annotations

import pytest

from spmd_diffusion.engine.policies import resolve_policy
from spmd_diffusion.engine.scheduler import BatchSource, Work
from spmd_diffusion.request import OmniDiffusionRequest


def _batches() -> list[list[OmniDiffusionRequest]]:
    return [
        [OmniDiffusionRequest(prompt="p", request_id=f"r{i}", num_inference_steps=1 + i % 2)]
        for i in range(6)
    ]


def _drain(source: BatchSource) -> list[Work]:
    taken = []
    while (work := source.take(0.0)) is not None:
        taken.append(work)
    return taken


@pytest.mark.parametrize("window", [None, 2])
def test_a_batch_keeps_its_input_position_whatever_the_order(window):
    batches = _batches()
    results = []
    source = BatchSource(
        iter(batches),
        resolve_policy("shape"),
        lambda work, output: results.append((work.index, output)),
        kwargs_for=lambda work: {"sink": work.index},
        window=window,
    )
    taken = _drain(source)
    assert all(batches[work.index] is work.requests for work in taken)
    assert all(work.kwargs == {"sink": work.index} for work in taken)
    order = [work.index for work in taken]
    # a list is ordered as a whole (every batch of a shape together); a stream window by window
    assert order == ([0, 2, 4, 1, 3, 5] if window is None else [0, 1, 2, 3, 4, 5])
    source.finished(taken[0], "output")
    assert results == [(taken[0].index, "output")]
