"""``--cache``: speed-up and image quality of each step-cache kind against the uncached run.

    python scripts/bench_cache.py [--model tiny-dit|deep-dit] [--steps 20] [--size 128] [--rounds 5]
                                  [--batch-size 2] [--kinds first-block:0.2,taylorseer,pab,faster]

``deep-dit`` is the tiny DiT pipeline with a deeper, wider PixArt transformer (``--depth``
blocks of ``--width`` channels, random weights from a fixed seed), built once into the model
cache: in the tiny DiT the denoiser is a small part of a call (the VAE and the text encoder
dominate), while in real DiTs it is nearly all of it, which is the regime a step cache is for.
Both the whole call and the denoiser's own time (forward hooks on it) are reported.

In one process: one uncached worker and one worker per cache kind
(``OmniDiffusionConfig.cache``, the code path of ``generate --cache``), all loaded up front.
Each round times one batch on every worker in turn, so a slow moment of a shared machine
falls on all of them alike; a worker's rate is its median over the rounds (after one warm-up
batch each). Quality: PSNR and the largest absolute difference of every cached image against
the uncached image of the same request (same prompt, seed and size), on [0, 1] pixels. Prints
one JSON object.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch); project modules load
# where used (models, models.loader): they pull in heavy modules or import back into this one

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker


def batch(index: int, args: argparse.Namespace) -> list[OmniDiffusionRequest]:
    return [
        OmniDiffusionRequest(
            prompt=f"a lighthouse at dusk {index}-{k}",
            seed=index * 100 + k,
            request_id=f"b{index}-{k}",
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
        )
        for k in range(args.batch_size)
    ]


def deep_dit(depth: int, width: int) -> str:
    """The tiny DiT pipeline with a ``depth`` x ``width`` transformer, saved once; its path."""
    import torch
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    from spmd_diffusion.models import ensure_tiny_model
    from spmd_diffusion.models.loader import cache_root

    target = cache_root() / f"bench-deep-dit-d{depth}-w{width}"
    if (target / "model_index.json").exists():
        return str(target)
    pipeline = PixArtAlphaPipeline.from_pretrained(str(ensure_tiny_model("tiny-dit")))
    heads = width // 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline.transformer = PixArtTransformer2DModel(
            sample_size=8,
            num_layers=depth,
            patch_size=2,
            attention_head_dim=32,
            num_attention_heads=heads,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=width,
            caption_channels=pipeline.text_encoder.config.d_model,
            norm_num_groups=8,
        )
    pipeline.save_pretrained(str(target))
    return str(target)


class DenoiserClock:
    """Wall seconds spent inside the denoiser's forward (pre- and post-forward hooks)."""

    def __init__(self, denoiser) -> None:
        self.seconds = 0.0
        self._start = 0.0
        denoiser.register_forward_pre_hook(self._enter)
        denoiser.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def pixels(output) -> np.ndarray:
    assert output.ok, output.errors
    return np.stack(
        [np.asarray(image, dtype=np.float64) / 255 for images in output.images for image in images]
    )


def quality(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    mse = float(np.mean((images - reference) ** 2))
    return {
        "psnr_db": round(10 * np.log10(1 / mse), 2) if mse else float("inf"),
        "max_abs": round(float(np.abs(images - reference).max()), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--kinds", default="first-block:0.2,taylorseer,pab,faster")
    parser.add_argument("--depth", type=int, default=12, help="deep-dit: transformer blocks")
    parser.add_argument("--width", type=int, default=256, help="deep-dit: channels (32 per head)")
    args = parser.parse_args()
    model = deep_dit(args.depth, args.width) if args.model == "deep-dit" else args.model
    names = ["none", *args.kinds.split(",")]
    workers = {
        name: DiffusionWorker(
            OmniDiffusionConfig(
                model=model,
                max_images_per_batch=args.batch_size,
                cache=None if name == "none" else name,
            )
        )
        for name in names
    }
    clocks = {name: DenoiserClock(worker.denoiser) for name, worker in workers.items()}
    images = {
        name: [pixels(worker.generate(batch(0, args)))] for name, worker in workers.items()
    }  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in names}
    denoiser: dict[str, list[float]] = {name: [] for name in names}
    for index in range(1, args.rounds + 1):
        for name, worker in workers.items():
            before = clocks[name].seconds
            start = time.perf_counter()
            output = worker.generate(batch(index, args))
            seconds[name].append(time.perf_counter() - start)
            denoiser[name].append(clocks[name].seconds - before)
            images[name].append(pixels(output))
    rates = {name: args.batch_size / statistics.median(times) for name, times in seconds.items()}
    denoiser_s = {name: statistics.median(times) for name, times in denoiser.items()}
    reference = np.concatenate(images["none"])
    kinds = {}
    for name in names[1:]:
        report = workers[name].get_cache_stats()
        kinds[report["cache"]] = {
            "images_per_s": round(rates[name], 3),
            "speedup": round(rates[name] / rates["none"], 3),
            "denoiser_speedup": round(denoiser_s["none"] / denoiser_s[name], 3),
            **quality(np.concatenate(images[name]), reference),
            "hooked_modules": report["cache_hooked_modules"],
        }
    print(
        json.dumps(
            {
                "model": args.model,
                **({"depth": args.depth, "width": args.width} if args.model == "deep-dit" else {}),
                "device": str(workers["none"].device),
                "steps": args.steps,
                "size": args.size,
                "batch_size": args.batch_size,
                "rounds": args.rounds,
                "images_compared": len(reference),
                "uncached_images_per_s": round(rates["none"], 3),
                "uncached_denoiser_share": round(
                    denoiser_s["none"] * rates["none"] / args.batch_size, 3
                ),
                "kinds": kinds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
