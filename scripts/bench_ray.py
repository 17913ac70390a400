"""The ray executor against mpiexec and against Ray itself, measured in one run.

    python scripts/bench_ray.py [--prompts 24] [--steps 20] [--repeats 3] [--calls 1000]

Starts a one-node Ray cluster in its own process (token authentication) so its start-up is
not timed, then:
- data parallel: ``omni-diffuse generate`` on the same prompts with ``mpiexec -n 1``,
  ``mpiexec -n 2`` and ``--executor ray --num-gpus 2`` (two CPU actors), one torch thread
  each, rounds interleaved; images/s from run.json (model loading excluded);
- RPC: a no-op ``collective_rpc("ping")`` of the ray executor over 2 actors against the raw
  Ray equivalent (``ray.get`` of one ``ping.remote()`` per actor on two plain actors),
  alternating rounds in one process.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (ray); project modules load where used
# (spmd_diffusion, models): they pull in heavy modules or import back into this one

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

BIN = Path(sys.executable).parent
# Ray reads its authentication mode at import: the cluster below uses tokens.
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"})
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "SPMD_DIFFUSION_LOG_LEVEL": "WARNING",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def start_cluster() -> str:
    """A one-node cluster in this process (stopped by ``ray.shutdown``, which ends it and
    nothing else); its address, for the ``omni-diffuse`` subprocesses."""
    import ray

    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )
    return ray.get_runtime_context().gcs_address


def generate(
    command: tuple[list[str], list[str]], prompts: Path, output: Path, model: str, env: dict
) -> float:
    launcher, options = command
    subprocess.run(
        [
            *launcher,
            "generate",
            *options,
            "--model",
            model,
            "--prompts",
            str(prompts),
            "--output",
            str(output),
            "--height",
            "64",
            "--width",
            "64",
            "--batch-size",
            "2",
            "--no-resume",
        ],
        check=True,
        env=env,
        timeout=1800,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    record = json.loads((output / "run.json").read_text())
    return record["totals"]["images_ok"] / record["seconds"]


def data_parallel(args: argparse.Namespace, address: str, tmp: Path) -> dict[str, list[float]]:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"benchmark prompt {i}", "steps": args.steps}) + "\n"
            for i in range(args.prompts)
        )
    )
    env = {**ENV, "RAY_ADDRESS": address}
    mpiexec, cli = str(BIN / "mpiexec"), str(BIN / "omni-diffuse")
    commands = {
        "mpiexec -n 1": ([mpiexec, "-n", "1", cli], []),
        "mpiexec -n 2": ([mpiexec, "-n", "2", cli], []),
        "ray, 2 actors": ([cli], ["--executor", "ray", "--num-gpus", "2"]),
    }
    rates: dict[str, list[float]] = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            rates[name].append(
                generate(
                    command, prompts, tmp / f"{repeat}-{name.replace(' ', '_')}", args.model, env
                )
            )
    return rates


class Pinger:
    def ping(self) -> int:
        return 0


def rpc(args: argparse.Namespace, address: str) -> dict[str, list[float]]:
    import ray

    from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig

    os.environ.update({"RAY_ADDRESS": address})
    raw = [ray.remote(num_cpus=1)(Pinger).remote() for _ in range(2)]
    results: dict[str, list[float]] = {"ray executor collective_rpc": [], "raw Ray actor calls": []}

    def timed(call) -> float:
        for _ in range(50):
            call()
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        return (time.perf_counter() - start) / args.calls * 1e6

    with DiffusionEngine(
        OmniDiffusionConfig(model="tiny-dit", executor_class="ray", num_gpus=2)
    ) as engine:
        for _ in range(args.repeats):
            results["ray executor collective_rpc"].append(
                timed(lambda: engine.collective_rpc("ping"))
            )
            results["raw Ray actor calls"].append(
                timed(lambda: ray.get([actor.ping.remote() for actor in raw]))
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--model", default="tiny-unet")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--only", choices=("rpc", "dp"), default=None, help="run one of the two parts"
    )
    args = parser.parse_args()
    if args.model in ("tiny-unet", "tiny-dit"):
        from spmd_diffusion.models import ensure_tiny_model

        args.model = str(ensure_tiny_model(args.model))
    ensure_tiny_model_for_rpc()
    address = start_cluster()
    try:
        calls = rpc(args, address) if args.only != "dp" else {}
        dp: dict[str, list[float]] = {}
        if args.only != "rpc":
            with tempfile.TemporaryDirectory() as tmp:
                dp = data_parallel(args, address, Path(tmp))
    finally:
        import ray

        ray.shutdown()

    if dp:
        print_dp(args, dp)
    if calls:
        print_rpc(calls)
    if args.json:
        args.json.write_text(json.dumps({"data_parallel": dp, "rpc_us": calls}, indent=2))


def print_dp(args: argparse.Namespace, dp: dict[str, list[float]]) -> None:
    one, two, ray_two = (
        statistics.median(dp[k]) for k in ("mpiexec -n 1", "mpiexec -n 2", "ray, 2 actors")
    )
    print(
        "| data parallel | mpiexec -n 1 (img/s) | mpiexec -n 2 (img/s) | ray 2 actors (img/s) "
        "| ray / mpiexec -n 2 | ray / 1 rank |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.prompts} prompts x {args.steps} steps, 64x64 | {one:.2f} | {two:.2f} "
        f"| {ray_two:.2f} | {ray_two / two:.2f}x | {ray_two / one:.2f}x |"
    )


def print_rpc(calls: dict[str, list[float]]) -> None:
    ours, raw = (
        statistics.median(calls[k]) for k in ("ray executor collective_rpc", "raw Ray actor calls")
    )
    print()
    print("| no-op RPC over 2 actors | round trip (us, median of rounds) |")
    print("|---|---|")
    print(f"| ray executor collective_rpc('ping') | {ours:.0f} |")
    print(f"| raw Ray: ray.get of one ping.remote() per actor | {raw:.0f} |")
    print(f"| ratio | {ours / raw:.2f}x |")


def ensure_tiny_model_for_rpc() -> None:
    from spmd_diffusion.models import ensure_tiny_model

    ensure_tiny_model("tiny-dit")


if __name__ == "__main__":
    main()
