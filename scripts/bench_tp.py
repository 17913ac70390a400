"""Benchmark: tensor-parallel (tp=2) and CFG-parallel denoising against one rank.

A PixArt-alpha-like DiT (PixArtTransformer2DModel, random weights, fp32, CPU) large enough
that compute dominates: width 1024 (16 heads x 64; PixArt-alpha itself is 1152 wide), 8
blocks, 120 caption tokens of a 4096-wide (T5-XXL-sized) caption projection, a 32x32 latent
(256 tokens, a 256 px image). ``--heads 8 --layers 12`` gives the 512-wide variant, where
the all-reduces weigh twice as much against the matmuls.
Each step is one denoiser call on the guided batch [uncond; cond] (batch 2), as diffusers
pipelines make it. One torch thread per rank; every variant is measured in the same launch:

- ``tp=1 alone``: rank 0 runs the whole model while rank 1 waits (single-process latency).
- ``tp=1 on every rank``: all ranks run the whole model at once (shows any contention).
- ``tp=2``: the model sharded over 2 ranks (``apply_tensor_parallel``).
- ``cfg=2``: the model replicated, the guided batch split over 2 ranks (``enable_cfg_parallel``).
- ``tp=2, DTensor dispatch per op``: the same sharding run through DTensor on every call
  (``apply_tensor_parallel(..., dtensor_forward=True)``), to show what the local-shard
  forward saves.

Variants are timed round-robin (one step of each per round) so that drift of a shared
machine hits all alike; the table gives the median and the minimum over rounds.

Run (2 ranks, hard timeout)::

    export OMP_NUM_THREADS=1
    timeout 900 torchrun --nproc-per-node 2 scripts/bench_tp.py
    timeout 900 torchrun --nproc-per-node 2 scripts/bench_tp.py --heads 8 --layers 12
    timeout 900 mpiexec -n 2 python scripts/bench_tp.py          # the same, launched by MPI

Rank 0 prints a markdown table and one JSON line (``--json PATH`` also writes it).
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers); optional extras load only where
# used (mpi4py)

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from spmd_diffusion.distributed.launcher import MPI, TORCHRUN, detect_launcher
from spmd_diffusion.parallel import (
    ParallelLayout,
    apply_tensor_parallel,
    build_device_mesh,
    enable_cfg_parallel,
    param_bytes,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--caption-channels", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument(
        "--steps", type=int, default=9, help="timed rounds (one step per variant each)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--pin", action="store_true", help="pin rank r (and its gloo threads) to CPU r"
    )
    parser.add_argument(
        "--skip-dtensor", action="store_true", help="omit the tp=2 DTensor-dispatch variant"
    )
    parser.add_argument("--json", default=None, help="also write the results here (rank 0)")
    return parser.parse_args()


def init_distributed() -> None:
    """gloo default group from torchrun's environment, or from MPI (port chosen by rank 0)."""
    kind = detect_launcher().kind
    if kind == MPI:
        from mpi4py import MPI as mpi

        comm = mpi.COMM_WORLD
        if comm.rank == 0:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        else:
            port = None
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(comm.bcast(port, root=0))
        dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    elif kind == TORCHRUN:
        dist.init_process_group("gloo")
    else:
        raise SystemExit(
            "launch with torchrun --nproc-per-node 2 or mpiexec -n 2 (see the docstring)"
        )


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)  # identical weights on every rank, as if loaded from one checkpoint
    return PixArtTransformer2DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        num_layers=args.layers,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=args.heads * args.head_dim,
        caption_channels=args.caption_channels,
        sample_size=args.latent,
        patch_size=2,
    ).eval()


def guided_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """One prompt under classifier-free guidance: latents doubled, embeddings [uncond; cond]."""
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, args.latent, args.latent, generator=generator)
    text = torch.randn(2, args.text_tokens, args.caption_channels, generator=generator)
    return {
        "hidden_states": torch.cat([latents] * 2),
        "encoder_hidden_states": text,
        "timestep": torch.full((2,), 500),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


def one_step(model: torch.nn.Module, inputs: dict[str, Any], active: bool) -> float:
    """Seconds for one denoiser call; ranks start together (barrier) and the slowest counts."""
    dist.barrier()
    start = time.perf_counter()
    if active:
        model(**inputs)[0].sum().item()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step is done when every rank is done
    return float(elapsed)


def matmul_seconds(active: bool, size: int = 1024, repeats: int = 8) -> float:
    """Seconds for ``repeats`` fp32 matmuls of ``size``^3, slowest rank: the compute that one
    rank alone, or every rank at once, gets from this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    dist.barrier()
    start = time.perf_counter()
    if active:
        for _ in range(repeats):
            torch.mm(a, b)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Median gloo all-reduce time of one activation (what each row-parallel layer costs)."""
    tensor = torch.randn(numel)
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.pin:
        names = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
        local = next((int(os.environ[name]) for name in names if name in os.environ), 0)
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[local % len(cpus)]})
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(
            f"this benchmark compares 1 and 2 ranks: launch exactly 2 ranks, got {world}"
        )
    inputs = guided_inputs(args)
    results: dict[str, Any] = {
        "world": world,
        "threads_per_rank": args.threads,
        "config": vars(args),
    }
    tp_mesh = build_device_mesh(ParallelLayout(world, tp=2), "cpu")["tp"]
    cfg_mesh = build_device_mesh(ParallelLayout(world, cfg=2), "cpu")["cfg"]
    baseline, sharded, guided = build_model(args), build_model(args), build_model(args)
    report = apply_tensor_parallel(sharded, tp_mesh)
    cfg = enable_cfg_parallel(guided, cfg_mesh)
    # (model, runs on this rank); all variants live side by side and are timed round-robin,
    # one step each per round, so drift of this shared VM hits every variant alike.
    variants: dict[str, tuple[torch.nn.Module, bool]] = {
        "tp=1 alone (rank 1 idle)": (baseline, rank == 0),
        "tp=1 on every rank": (baseline, True),
        "tp=2": (sharded, True),
        "cfg=2": (guided, True),
    }
    if not args.skip_dtensor:
        stock = build_model(args)
        apply_tensor_parallel(stock, tp_mesh, dtensor_forward=True)
        variants["tp=2, DTensor dispatch per op"] = (stock, True)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    matmul: dict[str, list[float]] = {"alone": [], "every rank": []}
    with torch.inference_mode():
        for round_index in range(args.warmup + args.steps):
            for name, (model, active) in variants.items():
                elapsed = one_step(model, inputs, active)
                if round_index >= args.warmup:
                    seconds[name].append(elapsed)
            alone, together = matmul_seconds(rank == 0), matmul_seconds(True)
            if round_index >= args.warmup:
                matmul["alone"].append(alone)
                matmul["every rank"].append(together)
    # Throughput of all ranks computing at once over one rank alone: the best speed-up any
    # 2-rank scheme can reach here (2.0 with 2 real cores; less with SMT siblings or throttling).
    results["compute_ceiling"] = round(
        world * statistics.median(matmul["alone"]) / statistics.median(matmul["every rank"]), 2
    )
    results["tp_report"] = {
        "attention": len(report.attention),
        "feedforward": len(report.feedforward),
        "skipped": report.skipped,
    }
    results["cfg_split_calls"] = cfg.split_calls
    tokens = (args.latent // 2) ** 2
    activation = 2 * tokens * args.heads * args.head_dim  # batch 2 x tokens x width
    results["allreduce_ms"] = 1e3 * allreduce_seconds(activation)
    results["allreduces_per_step"] = 3 * args.layers  # self-attn, cross-attn, feed-forward
    base_time = statistics.median(seconds["tp=1 alone (rank 1 idle)"])
    base_bytes = param_bytes(baseline)
    results["variants"] = {}
    for name, (model, _) in variants.items():
        step, nbytes = statistics.median(seconds[name]), param_bytes(model)
        results["variants"][name] = {
            "step_ms": round(1e3 * step, 1),
            "min_ms": round(1e3 * min(seconds[name]), 1),
            "speedup_vs_alone": round(base_time / step, 2),
            "param_MiB_per_rank": round(nbytes / 2**20, 1),
            "param_ratio": round(nbytes / base_bytes, 2),
        }
    if rank == 0:
        print_table(results, tokens)
        print(json.dumps(results))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def print_table(results: dict[str, Any], tokens: int) -> None:
    config = results["config"]
    print(
        f"DiT width {config['heads'] * config['head_dim']} "
        f"({config['heads']} heads x {config['head_dim']}), "
        f"{config['layers']} blocks, {tokens} image tokens + {config['text_tokens']} text tokens, "
        f"guided batch 2, fp32, {results['threads_per_rank']} thread/rank, "
        f"median of {config['steps']} interleaved rounds"
    )
    print(
        "| variant | step median (ms) | step min (ms) | speed-up vs tp=1 alone "
        "| params per rank (MiB) | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in results["variants"].items():
        print(
            f"| {name} | {row['step_ms']} | {row['min_ms']} | {row['speedup_vs_alone']}x "
            f"| {row['param_MiB_per_rank']} "
            f"| {row['param_ratio']}x |"
        )
    print(
        f"compute ceiling (matmul throughput of {results['world']} ranks at once / 1 rank alone): "
        f"{results['compute_ceiling']}x"
    )
    print(
        f"gloo all-reduce of one activation: {results['allreduce_ms']:.2f} ms x "
        f"{results['allreduces_per_step']} per step at tp=2; tp plan: {results['tp_report']}"
    )


if __name__ == "__main__":
    main()
