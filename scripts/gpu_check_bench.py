"""The plain diffusers baseline for scripts/gpu_check.sh: a hand-written batch loop.

    python scripts/gpu_check_bench.py --model DIR --prompts ITEMS.jsonl --output OUT \
        [--device cuda] [--dtype float16] [--steps 30] [--guidance 7.5] [--height 512] \
        [--width 512] [--batch-size 4]

What a user would write without this project: ``StableDiffusionPipeline.from_pretrained``,
``.to(device)``, then the items in fixed batches of ``--batch-size`` in file order (the
same batches ``omni-diffuse generate`` cuts), one CPU generator per image seeded with the
item's ``seed`` (as the engine does), and each image saved as ``OUT/images/<id>.png`` right
after its batch (synchronously, as such a loop does; ``save_seconds`` says what that cost, and
``pipeline_images_per_second`` is the rate without it).

One warm-up batch (the first batch's prompts) runs first and is timed on its own; the
timed loop then makes every item. ``OUT/bench.json`` gets: model load seconds, warm-up
seconds, the timed seconds and images/s (warm-up excluded), each batch's seconds, and
``cold_seconds``: the timed seconds plus what the warm-up batch cost over a warm batch,
i.e. what the loop would have taken without a warm-up, which is what ``run.json`` of an
engine run measures (it has no warm-up). Only public diffusers API.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, torch)

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def read_items(path: Path) -> list[dict]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            item = json.loads(line)
            item.setdefault("id", f"{number:06d}")
            items.append(item)
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, type=Path, help="JSONL: prompt, seed, id")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = parser.parse_args()

    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    items = read_items(args.prompts)
    batches = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    images_dir = args.output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, torch_dtype=getattr(torch, args.dtype)
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = time.perf_counter() - start

    def run_batch(batch: list[dict]) -> list:
        generators = [torch.Generator("cpu").manual_seed(int(item["seed"])) for item in batch]
        with torch.inference_mode():
            result = pipe(
                prompt=[item["prompt"] for item in batch],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=args.height,
                width=args.width,
                num_images_per_prompt=1,
                generator=generators,
            )
        return result.images

    start = time.perf_counter()
    run_batch(batches[0])
    sync()
    warmup_s = time.perf_counter() - start

    batch_seconds, save_seconds = [], 0.0
    start = time.perf_counter()
    for batch in batches:
        batch_start = time.perf_counter()
        images = run_batch(batch)  # PIL images: the pipeline has synchronised with the device
        save_start = time.perf_counter()
        for item, image in zip(batch, images, strict=True):
            image.save(images_dir / f"{item['id']}.png", format="PNG")
        save_seconds += time.perf_counter() - save_start
        batch_seconds.append(time.perf_counter() - batch_start)
    sync()
    seconds = time.perf_counter() - start
    full = [s for b, s in zip(batches, batch_seconds, strict=True) if len(b) == len(batches[0])]
    warm_batch = statistics.median(full) if full else warmup_s
    record = {
        "images": len(items),
        "batches": len(batches),
        "seconds": round(seconds, 4),
        "images_per_second": round(len(items) / seconds, 4),
        "cold_seconds": round(seconds + max(0.0, warmup_s - warm_batch), 4),
        "save_seconds": round(save_seconds, 4),
        "pipeline_images_per_second": round(len(items) / (seconds - save_seconds), 4),
        "load_seconds": round(load_s, 3),
        "warmup_seconds": round(warmup_s, 4),
        "batch_seconds": [round(s, 4) for s in batch_seconds],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "settings": {
            "steps": args.steps,
            "guidance": args.guidance,
            "height": args.height,
            "width": args.width,
            "batch_size": args.batch_size,
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": sys.version.split()[0],
        },
    }
    if device.type == "cuda":
        record["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    (args.output / "bench.json").write_text(json.dumps(record, indent=2))
    print(
        json.dumps(
            {
                k: record[k]
                for k in (
                    "images",
                    "seconds",
                    "images_per_second",
                    "cold_seconds",
                    "save_seconds",
                    "load_seconds",
                    "warmup_seconds",
                )
            }
        )
    )


if __name__ == "__main__":
    main()
