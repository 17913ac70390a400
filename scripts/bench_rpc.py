"""Round-trip cost of a no-op collective_rpc, per executor, against raw loops, at 2 ranks.

    python scripts/bench_rpc.py [--calls 3000] [--idle 3] [--json out.json]

Run without a launcher: it starts the MPI part with ``mpiexec -n 2`` and the gloo part with
``torchrun --nproc-per-node 2`` itself, runs the mp and uni executors in-process, and prints
one table. Measured in the same run:
- MPIExecutor ``collective_rpc("ping")`` vs a raw mpi4py ``bcast`` + ``gather`` loop;
- TorchDistributedExecutor vs raw ``broadcast_object_list`` + ``gather_object`` on gloo;
- mp (2 processes) and uni executors;
- CPU used by an idle worker rank while rank 0 does nothing for ``--idle`` seconds
  (blocking MPICH calls busy-poll a core; the executors back off), and the latency of the
  first call after that idle period.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch); project modules load where used
# (spmd_diffusion, distributed.control.mpi_control, entrypoints.spmd): they pull in heavy modules or
# import back into this one; test-local or optional helpers (bench_rpc)

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "tiny-dit"  # loads fastest; the model plays no part in an RPC round trip


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_loop(call, calls: int) -> float:
    for _ in range(min(100, calls)):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def median(values: list[float]) -> float:
    return statistics.median(values)


# Raw baselines run as RPCs: every rank runs the same loop at the same time, so raw and
# executor rounds can alternate in one job (the machine's noise hits both alike).
_RAW: dict = {}


def raw_mpi_loop(worker, calls: int) -> float:
    from spmd_diffusion.distributed.control.mpi_control import import_mpi

    MPI = import_mpi()
    comm = _RAW.setdefault("mpi", MPI.COMM_WORLD.Dup())
    message = ("call", 1, "ping", (), None, None)

    def raw() -> None:
        comm.bcast(message if comm.rank == 0 else None, root=0)
        comm.gather(comm.rank, root=0)

    return time_loop(raw, calls)


def raw_mpi_idle(worker, idle: float) -> float:
    """CPU % of rank 1 waiting in a plain blocking bcast while rank 0 sleeps."""
    comm = _RAW["mpi"]
    if comm.rank == 0:
        time.sleep(idle)
    before = cpu_seconds()
    comm.bcast(None, root=0)
    spent = comm.gather(cpu_seconds() - before, root=0)
    return 100 * spent[1] / idle if comm.rank == 0 else 0.0


def raw_gloo_loop(worker, calls: int) -> float:

    import torch.distributed as dist

    group = _RAW.setdefault(
        "gloo", dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=1))
    )
    rank = dist.get_rank()
    message = ("call", 1, "ping", (), None, None)

    def raw() -> None:
        box = [message if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        gathered = [None, None] if rank == 0 else None
        dist.gather_object(rank, gathered, dst=0, group=group)

    return time_loop(raw, calls)


def raw_gloo_idle(worker, idle: float) -> float:
    import torch.distributed as dist

    group, rank = _RAW["gloo"], dist.get_rank()
    if rank == 0:
        time.sleep(idle)
    before = cpu_seconds()
    box = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    gathered = [None, None] if rank == 0 else None
    dist.gather_object(cpu_seconds() - before, gathered, dst=0, group=group)
    return 100 * gathered[1] / idle if rank == 0 else 0.0


def executor_idle(engine, idle: float) -> dict:
    before = engine.collective_rpc(lambda worker: cpu_seconds(), unique_reply_rank=1)
    time.sleep(idle)
    start = time.perf_counter()
    engine.collective_rpc("ping")
    first = (time.perf_counter() - start) * 1e6
    after = engine.collective_rpc(lambda worker: cpu_seconds(), unique_reply_rank=1)
    return {
        "first_call_after_idle_us": first,
        "idle_worker_cpu_percent": 100 * (after - before) / idle,
    }


def spmd_part(
    executor: str, raw_loop, raw_idle, calls: int, idle: float, rounds: int
) -> dict | None:
    from spmd_diffusion import OmniDiffusionConfig
    from spmd_diffusion.entrypoints.spmd import spmd_engine

    with spmd_engine(OmniDiffusionConfig(model=MODEL, executor_class=executor)) as engine:
        if engine is None:
            return None
        raw_us, executor_us = [], []
        for _ in range(rounds):
            raw_us.append(engine.collective_rpc(raw_loop, args=(calls,), unique_reply_rank=0))
            executor_us.append(time_loop(lambda: engine.collective_rpc("ping"), calls))
        numbers = {
            "raw_us": median(raw_us),
            "rpc_us": median(executor_us),
            "rounds": rounds,
            "calls": calls,
            "raw_idle_cpu_percent": engine.collective_rpc(
                raw_idle, args=(idle,), unique_reply_rank=0
            ),
        }
        numbers.update(executor_idle(engine, idle))
        return numbers


def local_part(calls: int, idle: float) -> dict:
    from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig

    results = {}
    with DiffusionEngine(
        OmniDiffusionConfig(model=MODEL, executor_class="mp", num_gpus=2)
    ) as engine:
        results["mp"] = {"rpc_us": time_loop(lambda: engine.collective_rpc("ping"), calls)}
        results["mp"].update(executor_idle(engine, idle))
    with DiffusionEngine(OmniDiffusionConfig(model=MODEL, executor_class="uni")) as engine:
        results["uni"] = {"rpc_us": time_loop(lambda: engine.collective_rpc("ping"), calls)}
    return results


def launch(command: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_DIFFUSION_LOG_LEVEL": "WARNING"}
    subprocess.run(command, check=True, timeout=900, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (gloo: a tenth)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating raw/executor rounds; medians"
    )
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--part", choices=["mpi", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Ship the raw loops by reference (this file is importable as bench_rpc on every rank),
    # so their state (the raw communicators) lives on in each rank between calls.
    import bench_rpc

    if args.part == "mpi":
        result = spmd_part(
            "mpi",
            bench_rpc.raw_mpi_loop,
            bench_rpc.raw_mpi_idle,
            args.calls,
            args.idle,
            args.rounds,
        )
    elif args.part == "torch":
        result = spmd_part(
            "torchrun",
            bench_rpc.raw_gloo_loop,
            bench_rpc.raw_gloo_idle,
            max(50, args.calls // 10),
            args.idle,
            args.rounds,
        )
    if args.part:
        if result is not None:
            args.out.write_text(json.dumps(result))
        return

    bin_dir = Path(sys.executable).parent
    me = str(Path(__file__).resolve())
    common = ["--calls", str(args.calls), "--idle", str(args.idle), "--rounds", str(args.rounds)]
    with tempfile.TemporaryDirectory() as tmp:
        mpi_out, torch_out = Path(tmp) / "mpi.json", Path(tmp) / "torch.json"
        numbers = {
            "mpi": launch(
                [
                    str(bin_dir / "mpiexec"),
                    "-n",
                    "2",
                    sys.executable,
                    me,
                    "--part",
                    "mpi",
                    "--out",
                    str(mpi_out),
                    *common,
                ],
                mpi_out,
            )
        }
        numbers["torchrun"] = launch(
            [
                str(bin_dir / "torchrun"),
                "--nproc-per-node",
                "2",
                me,
                "--part",
                "torch",
                "--out",
                str(torch_out),
                *common,
            ],
            torch_out,
        )
    numbers.update(local_part(args.calls, args.idle))

    mpi, gloo, mp = numbers["mpi"], numbers["torchrun"], numbers["mp"]

    def row(name, us, raw=None, cpu=None, first=None):
        ratio = f"{us / raw:.2f}x" if raw else ""
        cpu_text = f"{cpu:.1f}%" if cpu is not None else ""
        first_text = f"{first:.0f}" if first is not None else ""
        return (name, us, ratio, cpu_text, first_text)

    rows = [
        row("raw mpi4py bcast+gather", mpi["raw_us"], cpu=mpi["raw_idle_cpu_percent"]),
        row(
            "MPIExecutor",
            mpi["rpc_us"],
            mpi["raw_us"],
            mpi["idle_worker_cpu_percent"],
            mpi["first_call_after_idle_us"],
        ),
        row(
            "raw gloo broadcast_object_list+gather_object",
            gloo["raw_us"],
            cpu=gloo["raw_idle_cpu_percent"],
        ),
        row(
            "TorchDistributedExecutor",
            gloo["rpc_us"],
            gloo["raw_us"],
            gloo["idle_worker_cpu_percent"],
            gloo["first_call_after_idle_us"],
        ),
        row(
            "MultiProcDiffusionExecutor (mp, 2 procs)",
            mp["rpc_us"],
            cpu=mp["idle_worker_cpu_percent"],
            first=mp["first_call_after_idle_us"],
        ),
        row("UniProcDiffusionExecutor (uni)", numbers["uni"]["rpc_us"]),
    ]
    print("| path | round trip (us) | vs raw | idle worker CPU | first call after idle (us) |")
    print("|---|---|---|---|---|")
    for name, us, ratio, cpu, first in rows:
        print(f"| {name} | {us:.1f} | {ratio} | {cpu} | {first} |")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
