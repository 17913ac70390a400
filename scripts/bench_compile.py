"""``--compile``: what torch.compile of the denoiser costs once and gains per image.

    python scripts/bench_compile.py [--model tiny-unet] [--steps 4] [--size 64]
                                    [--batches 8] [--batch-size 2]

In one process, on the device the worker picks (the CPU here; a GPU where there is one):
an eager worker and a ``compile=True`` worker (``OmniDiffusionConfig.compile``, the same code
path as ``generate --compile``) each run one warm-up batch -- for the compiled worker that is
where dynamo and inductor compile, reported as compile seconds from torch's own counters --
then ``--batches`` batches of ``--batch-size`` images, timed (steady state). Prints one JSON
object: compile seconds, steady images/s of both, the speed-up, and the largest pixel
difference between eager and compiled images of the same requests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import max_pixel_difference  # noqa: E402

from spmd_diffusion.data import OmniDiffusionConfig  # noqa: E402
from spmd_diffusion.request import OmniDiffusionRequest  # noqa: E402
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker  # noqa: E402


def batch(index: int, args: argparse.Namespace) -> list[OmniDiffusionRequest]:
    return [
        OmniDiffusionRequest(
            prompt=f"a lighthouse {index}-{k}",
            seed=index * 100 + k,
            request_id=f"b{index}-{k}",
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
        )
        for k in range(args.batch_size)
    ]


def measure(worker: DiffusionWorker, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    first = worker.generate(batch(0, args))
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(1, args.batches + 1):
        output = worker.generate(batch(index, args))
        assert output.ok, output.errors
    steady = time.perf_counter() - start
    return {
        "warmup_s": warmup,
        "steady_s": steady,
        "images": args.batches * args.batch_size,
        "first": first,
        "stats": worker.get_cache_stats(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-unet")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    results = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        worker = DiffusionWorker(
            OmniDiffusionConfig(
                model=args.model, compile=compile_, max_images_per_batch=args.batch_size
            )
        )
        results[name] = measure(worker, args)
        results[name]["device"] = str(worker.device)
        worker.shutdown()
    eager, compiled = results["eager"], results["compiled"]
    eager_rate = eager["images"] / eager["steady_s"]
    compiled_rate = compiled["images"] / compiled["steady_s"]
    difference = max(
        max_pixel_difference(a[0], b[0])
        for a, b in zip(eager["first"].images, compiled["first"].images, strict=True)
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "device": eager["device"],
                "steps": args.steps,
                "size": args.size,
                "batch_size": args.batch_size,
                "batches": args.batches,
                "compile_seconds": compiled["stats"].get("compile_seconds"),
                "warmup_batch_s": {
                    "eager": round(eager["warmup_s"], 3),
                    "compiled": round(compiled["warmup_s"], 3),
                },
                "steady_images_per_s": {
                    "eager": round(eager_rate, 3),
                    "compiled": round(compiled_rate, 3),
                },
                "steady_speedup": round(compiled_rate / eager_rate, 3),
                "max_pixel_difference": round(difference, 5),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
