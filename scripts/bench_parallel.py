"""Benchmark: what each parallel flag pays at 2 ranks on CPUs, against one rank alone.

Every variant is measured in the same launch, round-robin (one run of each per round, so the
drift of a shared machine hits all alike); "alone" is rank 0 running the whole model while
rank 1 waits (single-process latency, the machine's other core idle), "alone on every rank"
both ranks running it at once: what two busy cores give each other (memory bandwidth, caches),
the ceiling of any 2-rank split on this machine. Random weights, fp32,
one torch thread per rank. Peak memory is the rise of the process's resident set during a
run, sampled every millisecond (run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors
leave the resident set at once).

- ``sp``: a deep DiT at a long sequence: a Flux-shaped transformer (4 double- and 8
  single-stream blocks, 4 heads x 64, 4096 image + 128 text tokens: a 1024 px image),
  one denoiser call alone vs ``--ulysses 2`` vs ``--ring 2``; and a PixArt-shaped one
  (12 blocks, patch 1 over a 64x64 latent: 4096 tokens; the tool's own plan) the same way.
- ``cfg``: a Qwen-Image-shaped transformer (12 blocks) in a loop of 20 steps of two calls
  (conditional, unconditional, as Qwen-Image's true CFG makes them): alone vs the CFG pair
  (branch pairing: the first step whole, then one branch per rank).
- ``tp``: the Flux-shaped transformer at ``--tp 2``: step time and denoiser parameters per rank.
- ``vae``: the SD VAE (block widths 128..512, random weights) decoding a 384 px image, and
  Wan 2.1's VAE (base width 96) decoding 9 frames of 192 px: alone vs ``--vae-parallel``
  over 2 ranks, time and peak memory per rank.

Run (2 ranks, hard timeout)::

    export OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536
    timeout 1800 torchrun --nproc-per-node 2 scripts/bench_parallel.py --json /tmp/parallel.json

Rank 0 prints a markdown table per mode and one JSON line (``--json PATH`` also writes it).
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers); optional extras load only where
# used (psutil)

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_tp import init_distributed  # noqa: E402 - the same launch handling as the TP benchmark

from spmd_diffusion.parallel import (  # noqa: E402
    ParallelLayout,
    apply_tensor_parallel,
    build_device_mesh,
    enable_cfg_parallel,
    enable_sequence_parallel,
    enable_vae_parallel,
    param_bytes,
)

MODES = ("sp", "cfg", "tp", "vae")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant")
    parser.add_argument(
        "--latent",
        type=int,
        default=128,
        help="Flux latent side (packed 2x2: side/2 squared tokens)",
    )
    parser.add_argument("--json", default=None, help="also write the results here (rank 0)")
    return parser.parse_args()


class PeakRSS:
    """Highest resident-set rise above the level at the start, sampled every millisecond."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.running = False

    def __enter__(self) -> PeakRSS:
        self.base = self.process.memory_info().rss
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc_info: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss - self.base)


def timed(run: Callable[[], Any], active: bool) -> tuple[float, int]:
    """(seconds of the slowest rank, this rank's peak memory rise) for one run."""
    dist.barrier()
    with PeakRSS() as memory:
        start = time.perf_counter()
        if active:
            run()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed), memory.peak


def measure(
    variants: dict[str, tuple[Callable[[], Any], bool]], rounds: int
) -> dict[str, dict[str, float]]:
    """Warm each variant once, then time ``rounds`` round-robin; median seconds, max peak."""
    seconds = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            for name, (run, active) in variants.items():
                elapsed, peak = timed(run, active)
                if round_index:
                    seconds[name].append(elapsed)
                    peaks[name] = max(peaks[name], peak)
    peak_all = {}
    for name in variants:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, peaks[name])
        peak_all[name] = gathered
    return {
        name: {
            "median_s": statistics.median(seconds[name]),
            "min_s": min(seconds[name]),
            "peak_mib_per_rank": [round(p / 2**20, 1) for p in peak_all[name]],
        }
        for name in variants
    }


# -- models -----------------------------------------------------------------------------------
def flux_model() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)  # identical weights on every rank, as if loaded from one checkpoint
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=256,
        pooled_projection_dim=256,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    ).eval()


def flux_inputs(latent: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    side = latent // 2
    ids = torch.stack(
        torch.meshgrid(
            torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"
        ),
        -1,
    )
    return {
        "hidden_states": torch.randn(1, side * side, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 128, 256, generator=generator),
        "pooled_projections": torch.randn(1, 256, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": ids.reshape(-1, 3).float(),
        "txt_ids": torch.zeros(128, 3),
        "return_dict": False,
    }


def pixart_model() -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=64,
        num_layers=12,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=256,
        caption_channels=256,
        sample_size=64,
        patch_size=1,
    ).eval()


def pixart_inputs() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 64, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 120, 256, generator=generator),
        "timestep": torch.tensor([500]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


def qwen_model() -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=12,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=256,
        axes_dims_rope=(16, 24, 24),
    ).eval()


def qwen_loop(
    model: torch.nn.Module, cfg: Any = None, steps: int = 20, side: int = 32
) -> Callable[[], Any]:
    """A true-CFG denoising loop: per step the conditional and the unconditional call."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, side * side, 64, generator=generator)
    cond, uncond = (
        torch.randn(1, 64, 256, generator=generator),
        torch.randn(1, 40, 256, generator=generator),
    )

    def run() -> None:
        if cfg is not None:
            cfg.reset()
        current = latents
        for step in range(steps):
            t = torch.tensor([1.0 - step / steps])
            common = {
                "hidden_states": current,
                "timestep": t,
                "img_shapes": [(1, side, side)],
                "return_dict": False,
            }
            noise = model(encoder_hidden_states=cond, **common)[0]
            negative = model(encoder_hidden_states=uncond, **common)[0]
            current = current - 0.1 * (negative + 4.0 * (noise - negative))

    return run


def sd_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    ).eval()


# -- modes ------------------------------------------------------------------------------------
def bench_sp(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name, build, inputs in (
        ("flux", flux_model, flux_inputs(args.latent)),
        ("pixart", pixart_model, pixart_inputs()),
    ):
        alone, ulysses, ring = build(), build(), build()
        enable_sequence_parallel(
            ulysses, build_device_mesh(ParallelLayout(world, ulysses=2), "cpu"), 2, 1
        )
        enable_sequence_parallel(
            ring, build_device_mesh(ParallelLayout(world, ring=2), "cpu"), 1, 2
        )
        variants = {
            "alone": (lambda m=alone, i=inputs: m(**i), rank == 0),
            "alone on every rank": (lambda m=alone, i=inputs: m(**i), True),
            "ulysses 2": (lambda m=ulysses, i=inputs: m(**i), True),
            "ring 2": (lambda m=ring, i=inputs: m(**i), True),
        }
        results[name] = measure(variants, args.rounds)
    return results


def bench_cfg(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    alone, paired = qwen_model(), qwen_model()
    cfg = enable_cfg_parallel(paired, build_device_mesh(ParallelLayout(world, cfg=2), "cpu")["cfg"])
    results = measure(
        {
            "alone": (qwen_loop(alone), rank == 0),
            "alone on every rank": (qwen_loop(alone), True),
            "cfg 2 (branch pairing)": (qwen_loop(paired, cfg), True),
        },
        args.rounds,
    )
    results["calls"] = {"split": cfg.split_calls, "whole": cfg.whole_calls}
    return results


def bench_tp(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    inputs = flux_inputs(args.latent)
    alone, sharded = flux_model(), flux_model()
    report = apply_tensor_parallel(
        sharded, build_device_mesh(ParallelLayout(world, tp=2), "cpu")["tp"]
    )
    results = measure(
        {
            "alone": (lambda: alone(**inputs), rank == 0),
            "alone on every rank": (lambda: alone(**inputs), True),
            "tp 2": (lambda: sharded(**inputs), True),
        },
        args.rounds,
    )
    results["params"] = {
        "whole_mib": round(param_bytes(alone) / 2**20, 2),
        "per_rank_mib": round(report.param_bytes_after / 2**20, 2),
        "fraction": round(report.param_ratio, 3),
        "replicated": len(report.skipped),
    }
    return results


def wan_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
    ).eval()


def bench_vae(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    group = dist.new_group(list(range(world)))
    results = {}
    for name, build, latent in (
        ("sd (384 px image)", sd_vae, torch.randn(1, 4, 48, 48)),
        ("wan (9 frames of 192 px)", wan_vae, torch.randn(1, 16, 3, 24, 24)),
    ):
        whole, split = build(), build()
        enable_vae_parallel(split, group, rank, world)
        results[name] = measure(
            {
                "alone": (lambda m=whole, z=latent: m.decode(z), rank == 0),
                "vae parallel 2": (lambda m=split, z=latent: m.decode(z), True),
            },
            args.rounds,
        )
    return results


def table(mode: str, results: dict[str, Any]) -> str:
    lines = [
        f"### {mode}",
        "",
        "| model | variant | median s | min s | speed-up vs alone | peak MiB per rank |",
        "|---|---|---|---|---|---|",
    ]
    groups = results if mode in ("sp", "vae") else {mode: results}
    for model, variants in groups.items():
        base = variants["alone"]["median_s"]
        for name, row in variants.items():
            if not isinstance(row, dict) or "median_s" not in row:
                continue
            lines.append(
                f"| {model} | {name} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                f"{base / row['median_s']:.2f}x | {row['peak_mib_per_rank']} |"
            )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(
            f"this benchmark compares 1 and 2 ranks: launch exactly 2 ranks, got {world}"
        )
    benches = {"sp": bench_sp, "cfg": bench_cfg, "tp": bench_tp, "vae": bench_vae}
    results: dict[str, Any] = {"config": vars(args)}
    for mode in MODES if args.mode == "all" else (args.mode,):
        results[mode] = benches[mode](args, rank, world)
        if rank == 0:
            print(table(mode, results[mode]), flush=True)
            extra = {
                key: value for key, value in results[mode].items() if key in ("calls", "params")
            }
            if extra:
                print(json.dumps(extra), flush=True)
    if rank == 0:
        line = json.dumps(results)
        print(line)
        if args.json:
            Path(args.json).write_text(line + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
