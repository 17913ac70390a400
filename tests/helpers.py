"""Small helpers shared by tests."""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, peft, torch)

from __future__ import annotations

import threading

import numpy as np

from spmd_diffusion.request import OmniDiffusionRequest
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

    settings = {"num_inference_steps": 4, "height": 64, "width": 64}
    settings.update(overrides)
    return [
        OmniDiffusionRequest(
            prompt=f"a photo of item {i}", seed=100 + i, request_id=f"item-{i}", **settings
        )
        for i in range(count)
    ]


def hammer_from_two_threads(engine, rounds: int = 50) -> list[str]:
    """One thread makes collective calls, another generates, on one engine, ``rounds`` times
    each; returns every mismatch (a call that got another call's result)."""

    world = engine.executor.world_size
    problems: list[str] = []

    def calls() -> None:
        for token in range(rounds):
            got = engine.collective_rpc(lambda worker, token: (worker.rank, token), args=(token,))
            if got != [(rank, token) for rank in range(world)]:
                problems.append(f"collective_rpc round {token} got {got!r}")

    def generations() -> None:
        for token in range(rounds):
            request = OmniDiffusionRequest(
                prompt=f"round {token}",
                seed=token,
                request_id=f"round-{token}",
                num_inference_steps=1,
                height=32,
                width=32,
            )
            (output,) = engine.generate([request])
            if output.request_id != f"round-{token}" or not output.ok or output.seeds[0] != [token]:
                problems.append(
                    f"generate round {token} got {output.request_id!r} {output.errors!r}"
                )

    threads = [threading.Thread(target=calls), threading.Thread(target=generations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
        if thread.is_alive():
            problems.append(f"{thread.name} did not finish")
    return problems


def make_random_lora(directory, model_dir: str, seed: int = 0, rank: int = 4) -> str:
    """A LoRA for the tiny UNet with random (non-zero) weights, saved by diffusers' own
    ``save_lora_weights``: no training, yet it changes every image."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionPipeline.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # init_lora_weights=False: B is random too (the default starts it at zero, a no-op)
        pipeline.unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights=False,
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    StableDiffusionPipeline.save_lora_weights(
        str(directory), unet_lora_layers=get_peft_model_state_dict(pipeline.unet)
    )
    return str(directory)
