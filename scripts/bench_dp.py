"""Data-parallel throughput of ``omni-diffuse generate``: 2 ranks vs 1, and vs the
diffusers-documented baseline (accelerate's ``PartialState.split_between_processes``).

    python scripts/bench_dp.py [--prompts 32] [--steps 20] [--repeats 3] [--model tiny-unet]

Runs, for a uniform workload (every item ``--steps``) and a mixed one (half the items,
chosen at random with a fixed seed, at 4x the steps):
- ``mpiexec -n 1 omni-diffuse generate`` (one rank),
- ``mpiexec -n 2 omni-diffuse generate`` (two data-parallel replicas),
- the baseline under ``torchrun --nproc-per-node 2``: every process loads the same pipeline,
  takes its contiguous share of the prompts from ``split_between_processes`` and calls the
  pipeline in batches of ``--batch-size``, saving PNGs;
- the machine's ceiling for two ranks: two independent ``mpiexec -n 1`` jobs at the same
  time, each on one half of the items (halves balanced by steps), timed by the slower one.
  What two cores give two fully independent jobs bounds any 2-rank data-parallel speed-up.
Torch uses one thread per rank everywhere. Times exclude model loading (each side measures
from "model loaded" to "last image written"); the table reports images/s (median of
``--repeats``) and the ratios.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (accelerate, torch); project modules load
# where used (models): they pull in heavy modules or import back into this one

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def write_prompts(path: Path, count: int, steps: int, mixed: bool) -> None:
    heavy = set(random.Random(0).sample(range(count), count // 2)) if mixed else set()
    with path.open("w") as handle:
        for index in range(count):
            item = {
                "prompt": f"benchmark prompt number {index}",
                "steps": steps * 4 if index in heavy else steps,
            }
            handle.write(json.dumps(item) + "\n")


def run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_DIFFUSION_LOG_LEVEL": "WARNING"}
    subprocess.run(
        command,
        check=True,
        env=env,
        timeout=1800,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def ours(ranks: int, prompts: Path, output: Path, args: argparse.Namespace) -> float:
    run(
        [
            str(BIN / "mpiexec"),
            "-n",
            str(ranks),
            str(BIN / "omni-diffuse"),
            "generate",
            "--model",
            args.model,
            "--prompts",
            str(prompts),
            "--output",
            str(output),
            "--height",
            "64",
            "--width",
            "64",
            "--batch-size",
            str(args.batch_size),
            "--no-resume",
        ]
    )
    record = json.loads((output / "run.json").read_text())
    return record["totals"]["images_ok"] / record["seconds"]


def ceiling(prompts: Path, output: Path, args: argparse.Namespace) -> float:
    items = [json.loads(line) for line in prompts.read_text().splitlines()]
    halves: list[list[dict]] = [[], []]
    for item in sorted(
        items, key=lambda item: -item["steps"]
    ):  # greedy: heaviest to the lighter half
        min(halves, key=lambda half: sum(i["steps"] for i in half)).append(item)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_DIFFUSION_LOG_LEVEL": "WARNING"}
    jobs = []
    for index, half in enumerate(halves):
        half_prompts = output / f"half-{index}.jsonl"
        half_prompts.parent.mkdir(parents=True, exist_ok=True)
        half_prompts.write_text("".join(json.dumps(item) + "\n" for item in half))
        jobs.append(
            subprocess.Popen(
                [
                    str(BIN / "mpiexec"),
                    "-n",
                    "1",
                    str(BIN / "omni-diffuse"),
                    "generate",
                    "--model",
                    args.model,
                    "--prompts",
                    str(half_prompts),
                    "--output",
                    str(output / f"half-{index}"),
                    "--height",
                    "64",
                    "--width",
                    "64",
                    "--batch-size",
                    str(args.batch_size),
                    "--no-resume",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    for job in jobs:
        _, stderr = job.communicate(timeout=1800)
        if job.returncode:
            raise subprocess.CalledProcessError(job.returncode, job.args, stderr=stderr)
    seconds = max(
        json.loads((output / f"half-{i}" / "run.json").read_text())["seconds"] for i in range(2)
    )
    return len(items) / seconds


def baseline(prompts: Path, output: Path, args: argparse.Namespace) -> float:
    result = output / "baseline.json"
    run(
        [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "2",
            str(Path(__file__).resolve()),
            "--baseline-worker",
            "--model",
            args.model,
            "--prompt-file",
            str(prompts),
            "--out",
            str(output),
            "--batch-size",
            str(args.batch_size),
        ]
    )
    return json.loads(result.read_text())["images_per_second"]


def baseline_worker(args: argparse.Namespace) -> None:
    """The diffusers docs' recipe: PartialState + split_between_processes, same pipeline."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    from spmd_diffusion.models import load_pipeline

    torch.set_num_threads(1)
    # On CPU accelerate needs cpu=True to see torchrun's ranks; without it every process
    # believes it is alone and takes all the items.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise SystemExit(
            f"accelerate sees {state.num_processes} processes, "
            f"torchrun started {os.environ['WORLD_SIZE']}"
        )
    pipeline = load_pipeline(args.model, None, torch.float32).to(state.device)
    items = [json.loads(line) for line in Path(args.prompt_file).read_text().splitlines()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    start = time.perf_counter()
    with state.split_between_processes(list(enumerate(items))) as mine:
        by_steps: dict[int, list] = {}
        for index, item in mine:  # batch items that share settings, as a user would
            by_steps.setdefault(item["steps"], []).append((index, item))
        for steps, group in by_steps.items():
            for first in range(0, len(group), args.batch_size):
                batch = group[first : first + args.batch_size]
                generators = [torch.Generator("cpu").manual_seed(index) for index, _ in batch]
                images = pipeline(
                    [item["prompt"] for _, item in batch],
                    num_inference_steps=steps,
                    height=64,
                    width=64,
                    generator=generators,
                ).images
                for (index, _), image in zip(batch, images, strict=True):
                    image.save(out / f"{index:06d}.png")
    dist.barrier()
    seconds = time.perf_counter() - start
    if state.is_main_process:
        made = len(list(out.glob("*.png")))
        if made != len(items):
            raise SystemExit(f"baseline wrote {made} images for {len(items)} items")
        (out / "baseline.json").write_text(json.dumps({"images_per_second": len(items) / seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny-unet")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(args)
        return
    if args.model in ("tiny-unet", "tiny-dit"):
        from spmd_diffusion.models import ensure_tiny_model

        args.model = str(ensure_tiny_model(args.model))

    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("uniform", "mixed"):
            prompts = Path(tmp) / f"{workload}.jsonl"
            write_prompts(prompts, args.prompts, args.steps, workload == "mixed")
            rates: dict[str, list[float]] = {
                "1 rank": [],
                "2 ranks": [],
                "baseline 2 procs": [],
                "ceiling": [],
            }
            for repeat in range(args.repeats):  # interleaved, so machine noise hits all alike
                base = Path(tmp) / f"{workload}-{repeat}"
                rates["1 rank"].append(ours(1, prompts, base / "one", args))
                rates["2 ranks"].append(ours(2, prompts, base / "two", args))
                rates["baseline 2 procs"].append(baseline(prompts, base / "baseline", args))
                rates["ceiling"].append(ceiling(prompts, base / "ceiling", args))
            results[workload] = rates

    print(
        "| workload | 1 rank (img/s) | 2 ranks (img/s) | baseline 2 procs (img/s) "
        "| 2 ranks / 1 rank | 2 ranks / baseline | ceiling: 2 independent jobs / 1 rank |"
    )
    print("|---|---|---|---|---|---|---|")
    for workload, rates in results.items():
        one, two, base, top = (
            statistics.median(rates[k])
            for k in ("1 rank", "2 ranks", "baseline 2 procs", "ceiling")
        )
        print(
            f"| {workload} | {one:.2f} | {two:.2f} | {base:.2f} | {two / one:.2f}x "
            f"| {two / base:.2f}x | {top / one:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
