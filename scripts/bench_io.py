"""Dataset-scale batch I/O: a million prompts in, WebDataset shards out, with a pipeline that
costs nothing.

    python scripts/bench_io.py [--items 1000000] [--readback 100000] [--throughput 20000]
                               [--ranks 1,2] [--size 16] [--batch-size 256] [--shard-size 1000]
                               [--json out.json]

The stand-in pipeline of ``scripts/bench_output.py`` (patched in for ``load_pipeline`` on
every rank, then the package's own CLI runs: planning, streaming, scheduling, encoding,
shards, manifest, ``run.json``) returns ``--size`` x ``--size`` images at once, so what is
measured is the job's I/O path alone. Three parts, one run of each:

1. start-up and memory: ``mpiexec -n 2`` on a ``--items``-line prompt file to WebDataset
   shards. A thread in rank 0 samples its resident memory (``VmRSS``) and the manifest's
   line count every 0.25 s; reported: seconds from launch to the first pipeline call and to
   the first manifest line, and rank 0's RSS when the manifest reached 10k, 100k and
   ``--items`` lines (and its peak).
2. read-back: ``mpiexec -n 2`` on ``--readback`` items to shards, then every shard in
   ``shards.txt`` is read with ``webdataset.WebDataset``: sample count, keys, ids and seeds
   must equal the manifest's.
3. throughput: ``--throughput`` items to files and to shards at each of ``--ranks``
   (interleaved), images/s from ``run.json``; ratios against files at the first rank count.

``--startup-only`` times launch -> first pipeline call and first manifest line for a 10k-
and an ``--items``-line file, stopping each job there (the difference is what reading and
checking the larger file costs before any model loads).
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (numpy); optional extras load only where
# used (webdataset)

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SAMPLES_ENV = "BENCH_IO_SAMPLES"  # rank 0 appends (seconds, rss KiB, manifest lines) here
SAMPLE_EVERY_S = 0.25


def bench_output() -> Any:
    """scripts/bench_output.py as a module (its stand-in pipeline and loader patch)."""
    spec = importlib.util.spec_from_file_location(
        "bench_output", Path(__file__).with_name("bench_output.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample_rank0(samples: Path, manifest: Path) -> None:
    """Every SAMPLE_EVERY_S: (time, rank 0's RSS, manifest lines so far), appended to
    ``samples``."""
    lines, offset = 0, 0
    with open(samples, "a") as out:
        while True:
            try:
                with open(manifest, "rb") as stream:
                    stream.seek(offset)
                    chunk = stream.read()
                    offset += len(chunk)
                    lines += chunk.count(b"\n")
            except OSError:
                pass
            out.write(json.dumps([time.time(), rss_kib(), lines]) + "\n")
            out.flush()
            time.sleep(SAMPLE_EVERY_S)


def rank_main(cli_args: list[str]) -> None:
    import numpy as np

    sys.path.insert(0, str(REPO))
    helper = bench_output()
    bases = np.load(os.environ[helper.BASES_ENV])
    patched = helper.patch_loader(helper.StandInPipeline(bases, os.environ.get(helper.STAMPS_ENV)))
    if not patched:
        raise SystemExit("found no load_pipeline to patch")
    rank = next(
        (os.environ[n] for n in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK") if n in os.environ),
        "0",
    )
    if rank == "0" and os.environ.get(SAMPLES_ENV):
        output = Path(cli_args[cli_args.index("--output") + 1])
        threading.Thread(
            target=sample_rank0,
            args=(Path(os.environ[SAMPLES_ENV]), output / "manifest.jsonl"),
            daemon=True,
        ).start()
    helper.cli_main()(cli_args)


def job_command(
    ranks: int,
    prompts: Path,
    output: Path,
    workdir: Path,
    args: argparse.Namespace,
    output_format: str,
    samples: Path | None = None,
) -> tuple[list[str], dict[str, str], Path]:
    """The ``mpiexec -n ranks`` command of one stand-in job, its environment, and the
    directory where its ranks stamp their first pipeline call (cleared, with the output)."""
    stamps = workdir / f"stamps-{output.name}"
    subprocess.run(["rm", "-rf", str(output), str(stamps)], check=True)
    stamps.mkdir(parents=True)
    helper = bench_output()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SPMD_DIFFUSION_LOG_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
        helper.BASES_ENV: str(workdir / "bases.npy"),
        helper.STAMPS_ENV: str(stamps),
    }
    if samples is not None:
        env[SAMPLES_ENV] = str(samples)
    command = [
        str(BIN / "mpiexec"),
        "-n",
        str(ranks),
        sys.executable,
        str(Path(__file__).resolve()),
        "--rank-main",
        "--",
        "generate",
        "--model",
        "tiny-unet",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--height",
        str(args.size),
        "--width",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        "1",
        "--output-format",
        output_format,
        "--shard-size",
        str(args.shard_size),
    ]
    return command, env, stamps


def run_job(
    ranks: int,
    prompts: Path,
    output: Path,
    workdir: Path,
    args: argparse.Namespace,
    output_format: str,
    samples: Path | None = None,
) -> dict[str, Any]:
    """One ``mpiexec -n ranks`` job; its run.json, wall time and first-call time."""
    command, env, stamps = job_command(
        ranks, prompts, output, workdir, args, output_format, samples
    )
    start = time.time()
    done = subprocess.run(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=args.timeout,
    )
    wall = time.time() - start
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{ranks} rank(s) {output_format}: exit {done.returncode}")
    record = json.loads((output / "run.json").read_text())
    first_call = min(float(p.read_text()) for p in stamps.glob("first_call.*"))
    return {
        "ranks": ranks,
        "format": output_format,
        "run_json": record,
        "wall_s": round(wall, 2),
        "launch_to_first_call_s": round(first_call - start, 2),
        "start": start,
        "images_per_second": record["images_per_second"],
        "images_ok": record["totals"]["images_ok"],
    }


def time_to_first_output(
    ranks: int,
    prompts: Path,
    output: Path,
    workdir: Path,
    args: argparse.Namespace,
    output_format: str = "files",
) -> dict[str, Any]:
    """Start a job, wait for its first pipeline call and first manifest line, then stop it:
    the start-up alone (the planning pass over the whole input included)."""

    command, env, stamps = job_command(ranks, prompts, output, workdir, args, output_format)
    start = time.time()
    job = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first_call = first_line = None
    try:
        while time.time() - start < args.timeout and job.poll() is None:
            if first_call is None and list(stamps.glob("first_call.*")):
                first_call = time.time()
            manifest = output / "manifest.jsonl"
            if first_line is None and manifest.exists() and manifest.stat().st_size:
                first_line = time.time()
            if first_call and first_line:
                break
            time.sleep(0.05)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return {
        "ranks": ranks,
        "items": sum(1 for _ in open(prompts)),
        "launch_to_first_call_s": round(first_call - start, 2) if first_call else None,
        "launch_to_first_manifest_line_s": round(first_line - start, 2) if first_line else None,
    }


def rss_at(samples: list[list[float]], lines: int) -> float | None:
    """Rank 0's RSS (MiB) at the first sample with at least ``lines`` manifest lines."""
    for _, rss, count in samples:
        if count >= lines:
            return round(rss / 1024, 1)
    return None


def read_back(output: Path) -> dict[str, Any]:
    """Every sample of every listed shard through webdataset, checked against the manifest."""
    import webdataset as wds

    manifest = {}
    for line in (output / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["status"] == "ok":
            manifest[(record["path"], record["key"])] = record
    shards = [str(output / line) for line in (output / "shards.txt").read_text().split()]
    start = time.time()
    seen, mismatches = 0, 0
    keys = set()
    for sample in wds.WebDataset(shards, shardshuffle=False):
        seen += 1
        shard = os.path.relpath(sample["__url__"], output)
        keys.add((shard, sample["__key__"]))
        info = json.loads(sample["json"])
        record = manifest.get((shard, sample["__key__"]))
        if record is None or (info["id"], info["index"], info["seed"]) != (
            record["id"],
            record["index"],
            record["seed"],
        ):
            mismatches += 1
    return {
        "shards": len(shards),
        "samples_read": seen,
        "manifest_ok_lines": len(manifest),
        "keys_match": keys == set(manifest),
        "id_seed_mismatches": mismatches,
        "read_seconds": round(time.time() - start, 2),
    }


def main() -> None:
    if "--rank-main" in sys.argv[1:]:
        rest = sys.argv[sys.argv.index("--rank-main") + 1 :]
        rank_main(rest[1:] if rest[:1] == ["--"] else rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--readback", type=int, default=100_000)
    parser.add_argument("--throughput", type=int, default=20_000)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to skip: startup,readback,throughput"
    )
    parser.add_argument(
        "--startup-only",
        action="store_true",
        help="only time launch -> first image for 10k and --items lines (each job stopped there)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    helper = bench_output()
    import numpy as np

    info: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": helper.machine(),
        "commit": helper.git_head(),
        "date": date.today().isoformat(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="bench_io-", dir=os.environ.get("BENCH_IO_TMP")) as tmp:
        workdir = Path(tmp)
        np.save(workdir / "bases.npy", helper.make_bases(args.size))
        biggest = max(args.items, args.readback, args.throughput)
        prompts = {}
        with open(workdir / "all.txt", "w") as out:
            for index in range(biggest):
                out.write(f"benchmark prompt number {index}\n")
        for count in {args.items, args.readback, args.throughput}:
            path = workdir / f"p{count}.txt"
            subprocess.run(
                f"head -n {count} {workdir / 'all.txt'} > {path}", shell=True, check=True
            )
            prompts[count] = path

        if args.startup_only:
            small = workdir / "p10000.txt"
            subprocess.run(f"head -n 10000 {workdir / 'all.txt'} > {small}", shell=True, check=True)
            info["startup_only"] = [
                time_to_first_output(2, path, workdir / f"first-{n}", workdir, args)
                for n, path in ((10_000, small), (args.items, prompts[args.items]))
            ]
            print("startup_only:", json.dumps(info["startup_only"]), file=sys.stderr)
            skip = {"startup", "readback", "throughput"}
        if "startup" not in skip:
            samples_file = workdir / "samples.jsonl"
            job = run_job(
                2, prompts[args.items], workdir / "big", workdir, args, "webdataset", samples_file
            )
            samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
            first_line = next((t for t, _, count in samples if count > 0), None)
            info["startup"] = {
                "items": args.items,
                "ranks": 2,
                "images_ok": job["images_ok"],
                "wall_s": job["wall_s"],
                "images_per_second": job["images_per_second"],
                "launch_to_first_call_s": job["launch_to_first_call_s"],
                "launch_to_first_manifest_line_s": round(first_line - job["start"], 2)
                if first_line
                else None,
                "rank0_rss_mib_first_sample": round(samples[0][1] / 1024, 1) if samples else None,
                "rank0_rss_mib_at": {
                    str(n): rss_at(samples, n) for n in (10_000, 100_000, args.items)
                },
                "rank0_rss_mib_peak": round(max(rss for _, rss, _ in samples) / 1024, 1)
                if samples
                else None,
            }
            print("startup:", json.dumps(info["startup"]), file=sys.stderr)
            subprocess.run(["rm", "-rf", str(workdir / "big")], check=True)

        if "readback" not in skip:
            job = run_job(
                2, prompts[args.readback], workdir / "readback", workdir, args, "webdataset"
            )
            info["readback"] = {
                "items": args.readback,
                "images_ok": job["images_ok"],
                "images_per_second": job["images_per_second"],
                "wall_s": job["wall_s"],
                **read_back(workdir / "readback"),
            }
            print("readback:", json.dumps(info["readback"]), file=sys.stderr)
            subprocess.run(["rm", "-rf", str(workdir / "readback")], check=True)

        if "throughput" not in skip:
            runs = []
            for ranks in [int(r) for r in args.ranks.split(",")]:
                for output_format in ("files", "webdataset"):
                    job = run_job(
                        ranks,
                        prompts[args.throughput],
                        workdir / f"tp-{ranks}-{output_format}",
                        workdir,
                        args,
                        output_format,
                    )
                    runs.append(
                        {
                            key: job[key]
                            for key in (
                                "ranks",
                                "format",
                                "images_per_second",
                                "wall_s",
                                "images_ok",
                            )
                        }
                    )
                    print("throughput:", json.dumps(runs[-1]), file=sys.stderr)
                    subprocess.run(
                        ["rm", "-rf", str(workdir / f"tp-{ranks}-{output_format}")], check=True
                    )
            base = runs[0]["images_per_second"]
            for run in runs:
                run["ratio_vs_first"] = round(run["images_per_second"] / base, 2)
            info["throughput"] = {"items": args.throughput, "runs": runs}
    info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(info, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
