"""Small helpers shared by tests."""

from __future__ import annotations

import numpy as np

from spmd_diffusion.utils.images import to_float_array


def max_pixel_difference(first, second) -> float:
    """Largest absolute difference between two images, on [0, 1] pixels."""
    return float(np.abs(to_float_array(first) - to_float_array(second)).max())


def same_pixels(first_outputs, second_outputs) -> bool:
    """Every image of every request identical, pixel for pixel."""
    for first, second in zip(first_outputs, second_outputs, strict=True):
        assert first.request_ids == second.request_ids
        for images_a, images_b in zip(first.images, second.images, strict=True):
            for a, b in zip(images_a, images_b, strict=True):
                if not np.array_equal(np.asarray(a), np.asarray(b)):
                    return False
    return True


def small_requests(count: int = 4, **overrides):
    """64x64, 4-step requests with fixed seeds: seconds on one CPU core."""
    from spmd_diffusion.request import OmniDiffusionRequest

    settings = {"num_inference_steps": 4, "height": 64, "width": 64}
    settings.update(overrides)
    return [
        OmniDiffusionRequest(prompt=f"a photo of item {i}", seed=100 + i, request_id=f"item-{i}", **settings)
        for i in range(count)
    ]
