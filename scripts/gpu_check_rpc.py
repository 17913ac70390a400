"""Round trip of a no-op ``collective_rpc("ping")`` under a launcher, for scripts/gpu_check.sh.

    mpiexec -n 8 python scripts/gpu_check_rpc.py --out rpc.json [--calls 1000] [--rounds 5]

Every rank runs this file. ``DiffusionEngine(config)`` returns the engine on rank 0; the
other ranks serve it and exit when it closes (README, Python API). Rank 0 times ``--rounds``
rounds of ``--calls`` pings (after 100 untimed ones) and writes the per-call microseconds
(median and every round) to ``--out``, with every rank's ``get_cache_stats`` (device, dtype,
memory): with ``--device auto`` on a GPU machine that shows where the defaults put the
model. Only the public API: ``DiffusionEngine``, ``OmniDiffusionConfig``, ``collective_rpc``.
"""

# ruff: noqa: PLC0415 - project modules load where used (spmd_diffusion, data): they pull in heavy
# modules or import back into this one

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--model", default="tiny-dit", help="loads fastest; plays no part in a round trip"
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda (the model's placement)")
    args = parser.parse_args()

    from spmd_diffusion import DiffusionEngine
    from spmd_diffusion.data import OmniDiffusionConfig

    engine = DiffusionEngine(
        OmniDiffusionConfig(model=args.model, device=args.device)
    )  # ranks > 0 exit inside
    with engine:
        replies = engine.collective_rpc("ping")
        stats = engine.collective_rpc("get_cache_stats")  # device, dtype, memory of every rank
        for _ in range(min(100, args.calls)):
            engine.collective_rpc("ping")
        rounds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.calls):
                engine.collective_rpc("ping")
            rounds.append((time.perf_counter() - start) / args.calls * 1e6)
        record = {
            "ranks": len(replies),
            "replies": replies,
            "executor": type(engine.executor).__name__,
            "calls_per_round": args.calls,
            "rounds_us": [round(r, 2) for r in rounds],
            "median_us": round(statistics.median(rounds), 2) if rounds else None,
            "cache_stats": stats,
        }
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
