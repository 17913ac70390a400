"""What the engine adds around a fast GPU, measured on the CPU: a GPU-like stand-in pipeline.

    python scripts/bench_overhead.py [--images 96] [--size 512] [--steps 20] [--batch-size 4]
                                     [--launch-ms 2] [--device-ms 10] [--repeats 2]
                                     [--launchers plain,none,mpiexec,torchrun]

Each denoising step of the stand-in (``scripts/overhead_site/sitecustomize.py``) spends
``--launch-ms`` in Python holding the GIL, as kernel launches do, then ``--device-ms`` asleep
with the GIL released, as the device computes; its images are natural-looking (1/f noise
bases, ``bench_output.py``), so encoding one costs what a photo does. Compared, in one
sitting, configurations interleaved per repeat:

- ``plain``: the loop a user would write: call the stand-in per batch of ``--batch-size``,
  then save each PNG (``Image.save``) as it comes;
- ``none``: ``omni-diffuse generate`` without a launcher (the default ``mp`` executor: one
  spawned worker);
- ``mpiexec``: ``mpiexec -n 1 omni-diffuse generate``;
- ``torchrun``: ``torchrun --nproc-per-node 1 -m spmd_diffusion generate``;
- ``mpiexec2``: ``mpiexec -n 2``, two replicas: rank 0's worker thread runs beside the engine,
  which must poll MPI for rank 1's replies, while rank 1's worker runs alone. The column
  ``r0/r1 call`` is the ratio of the median pipeline-call time per image on rank 0 to rank 1's
  (manifest ``seconds``): above 1 is the GIL rank 0's engine takes from its own worker.

``--pipeline tiny-unet`` runs the real tiny UNet pipeline instead of the stand-in (true CPU
denoising, one torch thread per process): ``plain`` is then a script that imports diffusers,
loads the same saved pipeline with ``from_pretrained`` and saves each PNG, so its wall time
carries the same imports and load the tool pays (goal: wall <= 1.1x, images/s >= 0.98x).

``--no-output-work`` makes the stand-in return 8x8 images whatever the size asked, so encoding
and writing cost next to nothing in every configuration: what is left is the engine's own
overhead around the pipeline calls (goal: >= 0.98x the plain loop).

Reported: images/s of the generate phase (run.json ``images_per_second``: after loading,
to the last record; for ``plain`` the loop itself), the whole process's wall time, and their
ratios to ``plain``. Medians over ``--repeats``. The goal (issue 25): every launcher >= 1.1x
the plain loop at 512x512 (only overlapping output with the next batch gets past 1).
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (numpy); test-local or optional helpers
# (bench_output)

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_output import make_bases  # scripts/ is sys.path[0] when this file runs

from spmd_diffusion.models.loader import ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITE = Path(__file__).resolve().parent / "overhead_site"


PLAIN_DIFFUSERS = """
import json, os, time
import torch
from diffusers import DiffusionPipeline
torch.set_num_threads(1)
images, batch, steps, size, out = {images}, {batch}, {steps}, {size}, {out!r}
pipe = DiffusionPipeline.from_pretrained({model!r})
pipe.set_progress_bar_config(disable=True)
os.makedirs(out, exist_ok=True)
start = time.perf_counter()
for first in range(0, images, batch):
    seeds = range(first, min(images, first + batch))
    result = pipe(prompt=[f"a prompt {{s}}" for s in seeds], num_inference_steps=steps,
                  height=size, width=size,
                  generator=[torch.Generator().manual_seed(s) for s in seeds])
    for seed, image in zip(seeds, result.images):
        image.save(os.path.join(out, f"{{seed:06d}}.png"))
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def settings_env(args: argparse.Namespace, bases: Path) -> dict[str, str]:
    settings = {
        "bases": str(bases),
        "launch_ms": args.launch_ms,
        "device_ms": args.device_ms,
        "tiny_images": args.no_output_work,
    }
    return {
        **os.environ,
        **({"BENCH_OVERHEAD": json.dumps(settings)} if args.pipeline == "stand-in" else {}),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(SITE), str(REPO), os.environ.get("PYTHONPATH")])
        ),
        "SPMD_DIFFUSION_LOG_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
    }


PLAIN = """
import json, os, sys, time
sys.path.insert(0, {site!r})
import sitecustomize
import torch
stand_in = sitecustomize.GpuLikeStandIn(json.loads(os.environ["BENCH_OVERHEAD"]))
images, batch, steps, out = {images}, {batch}, {steps}, {out!r}
os.makedirs(out, exist_ok=True)
start = time.perf_counter()
for first in range(0, images, batch):
    seeds = range(first, min(images, first + batch))
    result = stand_in(prompt=[f"p{{s}}" for s in seeds], num_inference_steps=steps,
                      generator=[torch.Generator().manual_seed(s) for s in seeds])
    for seed, image in zip(seeds, result.images):
        image.save(os.path.join(out, f"{{seed:06d}}.png"))
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def run(
    launcher: str, args: argparse.Namespace, workdir: Path, bases: Path, prompts: Path
) -> dict[str, float]:
    output = workdir / f"out-{launcher}"
    subprocess.run(["rm", "-rf", str(output)], check=True)
    env = settings_env(args, bases)
    generate = [
        "generate",
        "--model",
        "tiny-unet",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--height",
        str(args.size),
        "--width",
        str(args.size),
        "--no-resume",
    ]
    commands = {
        "plain": [sys.executable, "-c", plain_script(args, output)],
        "none": [str(BIN / "omni-diffuse"), *generate],
        "mpiexec": [str(BIN / "mpiexec"), "-n", "1", str(BIN / "omni-diffuse"), *generate],
        "mpiexec2": [str(BIN / "mpiexec"), "-n", "2", str(BIN / "omni-diffuse"), *generate],
        "torchrun": [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "1",
            "-m",
            "spmd_diffusion",
            *generate,
        ],
    }
    start = time.perf_counter()
    done = subprocess.run(
        commands[launcher], env=env, capture_output=True, text=True, timeout=args.timeout
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{launcher}: exit {done.returncode}\n{done.stderr[-3000:]}")
    if launcher == "plain":
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        made = len(list(output.glob("*.png")))
    else:
        record = json.loads((output / "run.json").read_text())
        seconds, made = record["seconds"], record["totals"]["images_ok"]
    if made != args.images:
        raise SystemExit(f"{launcher}: {made} images, {args.images} planned")
    result = {"images_per_s": args.images / seconds, "wall_s": wall}
    if launcher == "mpiexec2":
        result["rank0_per_rank1_call"] = call_time_ratio(output / "manifest.jsonl")
    return result


def plain_script(args: argparse.Namespace, output: Path) -> str:
    """The loop a user would write, around the stand-in or around the real pipeline."""
    common = {"images": args.images, "batch": args.batch_size, "steps": args.steps}
    if args.pipeline == "stand-in":
        return PLAIN.format(site=str(SITE), out=str(output), **common)
    model = str(ensure_tiny_model(args.pipeline))
    return PLAIN_DIFFUSERS.format(model=model, size=args.size, out=str(output), **common)


def call_time_ratio(manifest: Path) -> float:
    """Median pipeline-call seconds per image on rank 0 over rank 1's."""
    seconds: dict[int, list[float]] = {0: [], 1: []}
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        seconds[record["rank"]].append(record["seconds"])
    return statistics.median(seconds[0]) / statistics.median(seconds[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--launch-ms", type=float, default=2.0)
    parser.add_argument("--device-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--launchers", default="plain,none,mpiexec,torchrun")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--pipeline", choices=("stand-in", "tiny-unet"), default="stand-in")
    parser.add_argument(
        "--no-output-work", action="store_true", help="8x8 images: encoding and writing ~free"
    )
    args = parser.parse_args()
    if args.no_output_work and args.pipeline != "stand-in":
        parser.error("--no-output-work needs the stand-in pipeline")
    launchers = args.launchers.split(",")
    results: dict[str, list[dict[str, float]]] = {launcher: [] for launcher in launchers}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as directory:
        workdir = Path(directory)
        bases = workdir / "bases.npy"
        np.save(bases, make_bases(args.size))
        prompts = workdir / "prompts.txt"
        prompts.write_text("".join(f"a prompt {index}\n" for index in range(args.images)))
        for _ in range(args.repeats):
            for launcher in launchers:
                results[launcher].append(run(launcher, args, workdir, bases, prompts))
    median = {
        launcher: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for launcher, runs in results.items()
    }
    base = median.get("plain", next(iter(median.values())))
    step = (
        f"{args.launch_ms:g} ms GIL + {args.device_ms:g} ms device"
        if args.pipeline == "stand-in"
        else f"{args.pipeline} on the CPU, one torch thread per process"
    )
    print(
        f"{args.images} images {args.size}x{args.size}, {args.steps} steps ({step}),"
        f" batches of {args.batch_size}; median of {args.repeats}"
    )
    if args.no_output_work:
        print("output work disabled: the stand-in returns 8x8 images")
    print(
        f"{'launcher':10s} {'images/s':>9s} {'x plain':>8s} {'wall s':>8s} {'x plain':>8s}"
        f" {'r0/r1 call':>10s}"
    )
    for launcher, row in median.items():
        ratio = row.get("rank0_per_rank1_call")
        print(
            f"{launcher:10s} {row['images_per_s']:9.2f}"
            f" {row['images_per_s'] / base['images_per_s']:8.2f}"
            f" {row['wall_s']:8.1f} {row['wall_s'] / base['wall_s']:8.2f}"
            f" {'' if ratio is None else f'{ratio:10.3f}'}"
        )


if __name__ == "__main__":
    main()
