"""Schedule policies on a mixed batch job: how long the same batches take under the default
(shape: the plan's order, a shape's chunks together; fifo is the same for a batch job) and
cost (longest first), on the same engine.

    python scripts/bench_policies.py [--replicas 2] [--repeats 3]

The workload, in item order, is what a prompt file of mixed settings looks like: 24 items
cycling 4/4/4/16 denoising steps, then 2 items of 64 steps (a user's "final quality" rows at
the end). Batches are the engine's fixed chunks (``--batch-size`` images); only their order
changes, so every policy makes the same pixels. Reports the wall time of the whole job
(median of ``--repeats``), the ratio to shape, and how long replicas sat idle at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest
from spmd_diffusion.engine.batching import chunk_requests
from spmd_diffusion.engine.hooks import EngineHooks
from spmd_diffusion.engine.policies import resolve_policy


class Busy(EngineHooks):
    """When each replica finished its last batch."""

    def __init__(self) -> None:
        self.last_finish: dict[int, float] = {}

    def batch_finished(self, batch, seconds, failed) -> None:
        self.last_finish[batch.replica] = time.monotonic()


def workload(size: int) -> list[OmniDiffusionRequest]:
    steps = [4, 4, 4, 16] * 6 + [64, 64]
    return [
        OmniDiffusionRequest(
            prompt=f"mixed item {index}",
            request_id=f"m{index}",
            seed=index,
            num_inference_steps=count,
            height=size,
            width=size,
        )
        for index, count in enumerate(steps)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="tiny-unet")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    busy = Busy()
    config = OmniDiffusionConfig(
        model=args.model,
        executor_class="mp",
        num_gpus=args.replicas,
        device="cpu",
        max_images_per_batch=args.batch_size,
    )
    times: dict[str, list[float]] = {"shape": [], "cost": []}
    idle: dict[str, list[float]] = {name: [] for name in times}
    with DiffusionEngine(config, hooks=[busy]) as engine:
        requests = engine.prepare(workload(args.size))
        batches = chunk_requests(requests, args.batch_size)
        engine.generate(requests[:2])  # warm every replica's first call
        for _ in range(args.repeats):
            for name in times:
                engine.scheduler.policy = resolve_policy(name)
                busy.last_finish.clear()
                start = time.monotonic()
                engine.scheduler.run(batches, lambda work, output: None)
                end = time.monotonic()
                times[name].append(end - start)
                idle[name].append(end - min(busy.last_finish.values()))
    baseline = statistics.median(times["shape"])
    print(
        f"{len(requests)} items in {len(batches)} batches of <= {args.batch_size}, "
        f"{args.replicas} replicas (mp, CPU, 1 thread each), {args.size}x{args.size}, "
        f"median of {args.repeats}"
    )
    print(f"{'policy':8s} {'seconds':>8s} {'x shape speed':>14s} {'idle tail s':>12s}")
    for name in times:
        seconds = statistics.median(times[name])
        print(
            f"{name:8s} {seconds:8.2f} {baseline / seconds:14.2f} "
            f"{statistics.median(idle[name]):12.2f}"
        )


if __name__ == "__main__":
    main()
