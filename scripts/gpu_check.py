"""The parts of scripts/gpu_check.sh (which sets up the environment and then runs this).

    python scripts/gpu_check.py --out OUT --work WORK [--cpu-smoke] [--parts a,b,c,d]

Every step is a separate command (``omni-diffuse generate``, ``mpiexec -n N omni-diffuse
generate``, the helper scripts gpu_check_*.py) with its own timeout, run in its own process
session so a hung MPI job is killed whole; a failed or timed-out step is recorded and the
next one runs. A global deadline ($GPU_CHECK_DEADLINE, epoch seconds) clips every step's
timeout and skips what no longer fits. Each process start costs ~20 s on the GPU machine
(imports and loading; measured 2026-11-27), so the steps that check behaviour rather than
speed run at the same time, first; the timed steps then run one at a time:

  phase 1, concurrently:
  a  tiny-unet and tiny-dit: ``generate`` with no launcher and under ``mpiexec -n 2`` (two
     replicas on the one GPU), PNGs compared; every rank's device/dtype via the public API.
  c  ``--tp 2`` and ``--cfg-parallel`` under ``mpiexec -n 2`` on the one GPU (expected: a
     clear refusal, not a hang), and the same with ``--device cpu`` (expected to work; images
     compared with part d's one-rank images of the same items).
     (and part b's model build: an SD-1.5-sized random-weight fp16 pipeline)
  phase 2:
  b  a plain diffusers batch loop (scripts/gpu_check_bench.py) against ``generate`` with no
     launcher, ``mpiexec -n 1`` and ``mpiexec -n 2``: same items, seeds and batches; images/s,
     the ratios and the image differences.
  phase 3:
  d  data-parallel scaling on the CPU cores (``--device cpu``, one thread a rank) at
     1, 8, then 4 and 2 ranks, and the ``collective_rpc("ping")`` round trip at 8 ranks.

Without a usable GPU (or with ``--cpu-smoke``) every part runs at smoke sizes on the CPU
and the GPU-only steps are skipped with the reason. Writes OUT/results.json (every step:
command, exit code, seconds, log tail; every measurement) and OUT/summary.md (printed at
the end), and OUT/logs.tar.gz (every step's log, run.json, bench.json and manifest).
Uses only the CLI, the helper scripts and the package's public API.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL, numpy)

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent

# Sizes per mode. GPU: the real check. Smoke: every code path on a small CPU machine.
SIZES = {
    "gpu": {
        "a_items": 8,
        "a_steps": 8,
        "a_size": 64,
        "b_items": 24,
        "b_steps": 30,
        "b_size": 512,
        "b_batch": 4,
        "b_small": False,
        "c_items": 4,
        "d_items": 96,
        "d_steps": 16,
        "d_size": 64,
        "dp_ranks": [1, 2, 4, 8],
        "rpc_ranks": 8,
        "rpc_calls": 1000,
    },
    "cpu-smoke": {
        "a_items": 8,
        "a_steps": 2,
        "a_size": 64,
        "b_items": 8,
        "b_steps": 3,
        "b_size": 64,
        "b_batch": 4,
        "b_small": True,
        "c_items": 4,
        "d_items": 16,
        "d_steps": 4,
        "d_size": 64,
        "dp_ranks": [1, 2, 4, 8],
        "rpc_ranks": min(8, max(2, os.cpu_count() or 1)),
        "rpc_calls": 200,  # 8 ranks on 2 cores: ~20 ms a call
    },
}
TIMEOUTS = {  # seconds per step (the global deadline clips them further)
    "probe": 60,
    "a_stats": 120,
    "a_gen": 120,
    "b_build": 150,
    "b_plain": 120,
    "b_engine": 120,
    "c_gpu": 75,
    "c_cpu": 120,
    "d_gen": 75,
    "d_rpc": 75,
}


class Checker:
    def __init__(self, out: Path, work: Path, mode: str, deadline: float, sizes: dict) -> None:
        self.out, self.work, self.mode, self.deadline, self.sizes = out, work, mode, deadline, sizes
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: list[dict] = []
        self.results: dict = {"mode": mode, "sizes": sizes, "parts": {}}
        mpiexec = BIN / "mpiexec"
        self.mpiexec = str(mpiexec) if mpiexec.exists() else (shutil.which("mpiexec") or "mpiexec")
        omni = BIN / "omni-diffuse"
        self.omni = [str(omni)] if omni.exists() else [sys.executable, "-m", "spmd_diffusion"]
        self.env = {
            **os.environ,
            "SPMD_DIFFUSION_CACHE": str(work / "cache"),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HYDRA_LAUNCHER": os.environ.get("HYDRA_LAUNCHER", "fork"),  # one node: no ssh
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    # -- running steps ----------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.time()

    def start(
        self,
        part: str,
        name: str,
        cmd: list[str],
        timeout: float,
        env: dict | None = None,
        min_needed: float = 10.0,
        display: str | None = None,
        output: Path | None = None,
    ) -> dict:
        """Start one command in its own process session; ``finish`` waits for it (with a
        timeout)."""
        step = {
            "part": part,
            "name": name,
            "cmd": display or " ".join(cmd),
            "log": f"logs/{name}.log",
        }
        if output is not None:
            step["output"] = str(output)
        self.steps.append(step)
        budget = min(timeout, self.remaining() - 5)
        if budget < min_needed:
            step.update(status="skipped", reason=f"global deadline: {self.remaining():.0f} s left")
            print(f"-- {name}: SKIPPED ({step['reason']})", flush=True)
            return step
        print(f"-- {name}: {step['cmd']}  (timeout {budget:.0f} s)", flush=True)
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        step.update(_process=process, _log=log, _start=time.perf_counter(), _budget=budget)
        return step

    def finish(self, step: dict) -> dict:
        """Wait for a started step (killing its session at its timeout) and record the outcome."""
        process = step.pop("_process", None)
        if process is None:
            return step
        log, started, budget = step.pop("_log"), step.pop("_start"), step.pop("_budget")
        timed_out = False
        try:
            rc = process.wait(timeout=max(0.1, budget - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_session(process)
            rc = 124
        log.close()
        seconds = time.perf_counter() - started
        text = (self.logs / f"{step['name']}.log").read_text(errors="replace")
        step.update(
            rc=rc,
            seconds=round(seconds, 2),
            timed_out=timed_out,
            status="ok" if rc == 0 else ("timeout" if timed_out else "failed"),
            tail=tail(text, 25),
            traceback="Traceback (most recent call last)" in text,
        )
        print(
            f"   {step['name']}: rc={rc} {'TIMED OUT ' if timed_out else ''}{seconds:.1f} s",
            flush=True,
        )
        if rc != 0:
            print("   " + "\n   ".join(tail(text, 8).splitlines()), flush=True)
        if "output" in step:
            output = Path(step["output"])
            step.update(read_run_json(output))
            step["device_seen"] = devices_seen(self.logs / f"{step['name']}.log")
        return step

    def run(self, *args, **kwargs) -> dict:
        return self.finish(self.start(*args, **kwargs))

    def start_generate(
        self,
        part: str,
        name: str,
        ranks: int | None,
        args: list[str],
        timeout_key: str,
        env: dict | None = None,
    ) -> dict:
        """``omni-diffuse generate`` with no launcher (ranks None) or under ``mpiexec -n ranks``."""
        launcher = [] if ranks is None else [self.mpiexec, "-n", str(ranks)]
        output = Path(args[args.index("--output") + 1])
        return self.start(
            part,
            name,
            launcher + self.omni + ["generate", *args],
            TIMEOUTS[timeout_key],
            env,
            output=output,
        )

    def generate(self, *args, **kwargs) -> dict:
        return self.finish(self.start_generate(*args, **kwargs))

    # -- parts --------------------------------------------------------------------------------
    def phase_correctness(self, parts: list[str]) -> None:
        """Parts a and c, and part b's model build, all at once: they check behaviour, not speed
        (every process start costs ~20 s of imports and loading on the GPU machine)."""
        specs: list[tuple[str, Callable[[], dict]]] = []
        self._plan_correctness(parts, specs)
        # As many at once as the cores allow (each start is CPU-bound imports): all of them on
        # the 16-core GPU machine, one at a time on a 2-core development machine.
        slots = int(
            os.environ.get("GPU_CHECK_SLOTS") or max(1, min(10, (os.cpu_count() or 1) * 2 // 3))
        )
        started = self.run_concurrently(specs, slots)
        self._read_correctness(parts, started)

    def run_concurrently(
        self, specs: list[tuple[str, Callable[[], dict]]], slots: int
    ) -> dict[str, dict]:
        """Start the steps ``specs`` makes, at most ``slots`` at a time; finish every one."""
        started: dict[str, dict] = {}
        queue, running = list(specs), []
        try:
            while queue or running:
                while queue and len(running) < slots:
                    key, start = queue.pop(0)
                    started[key] = step = start()
                    if "_process" in step:
                        running.append(step)
                for step in list(running):
                    if (
                        step["_process"].poll() is not None
                        or time.perf_counter() - step["_start"] >= step["_budget"]
                    ):
                        running.remove(step)
                        self.finish(step)
                time.sleep(0.2)
        finally:  # never leave a started job behind, whatever went wrong
            for step in running:
                self.finish(step)
        return started

    def _plan_correctness(self, parts: list[str], specs: list) -> None:
        s, gpu = self.sizes, self.mode == "gpu"
        starts: dict[str, Callable[[], dict]] = {}
        if "a" in parts:
            part = self.results["parts"].setdefault(
                "a", {"title": "tiny models: no launcher vs mpiexec -n 2"}
            )
            part["note"] = (
                "run concurrently with parts c and the model build: their speeds mean nothing"
                + ("" if gpu else "; no GPU: on the CPU as a stand-in (device auto -> cpu)")
            )
            stats_out = self.work / "a" / "stats.json"
            stats_out.parent.mkdir(parents=True, exist_ok=True)
            stats_out.unlink(missing_ok=True)
            starts["a_stats"] = lambda: self.start(
                "a",
                "a_stats_mpi2",
                [
                    self.mpiexec,
                    "-n",
                    "2",
                    sys.executable,
                    str(HERE / "gpu_check_rpc.py"),
                    "--model",
                    "tiny-unet",
                    "--device",
                    "auto",
                    "--calls",
                    "100",
                    "--rounds",
                    "1",
                    "--out",
                    str(stats_out),
                ],
                TIMEOUTS["a_stats"],
            )
            prompts = write_items(
                self.work / "a" / "items.jsonl", s["a_items"], "a tiny test picture", 100
            )
            for model in ("tiny-unet", "tiny-dit"):
                common = [
                    "--model",
                    model,
                    "--prompts",
                    str(prompts),
                    "--steps",
                    str(s["a_steps"]),
                    "--height",
                    str(s["a_size"]),
                    "--width",
                    str(s["a_size"]),
                    "--batch-size",
                    "4",
                    "--no-resume",
                ]
                for variant, ranks in (("nolauncher", None), ("mpi2", 2)):
                    args = [*common, "--output", str(self.work / "a" / f"{model}-{variant}")]
                    starts[f"a_{model}_{variant}"] = functools.partial(
                        self.start_generate, "a", f"a_{model}_{variant}", ranks, args, "a_gen"
                    )
        if "c" in parts:
            part = self.results["parts"].setdefault(
                "c",
                {
                    "title": "parallel flags (--tp 2, --cfg-parallel, --ulysses 2, "
                    "--ring 2, --vae-parallel) on one GPU, and on CPU"
                },
            )
            # The first items of part d's list (same ids, seeds, steps, size, batch): part d's
            # one-rank CPU images are the reference for the tiny-unet CPU runs here.
            prompts = write_items(
                self.work / "c" / "items.jsonl", s["c_items"], "a scaling test picture", 9000
            )
            for label, model, flags in PARALLEL_CASES:
                common = [
                    "--model",
                    model,
                    "--prompts",
                    str(prompts),
                    "--steps",
                    str(s["d_steps"]),
                    "--height",
                    str(s["d_size"]),
                    "--width",
                    str(s["d_size"]),
                    "--batch-size",
                    "4",
                    "--no-resume",
                ]
                if gpu:
                    starts[f"c_{label}_gpu"] = functools.partial(
                        self.start_generate,
                        "c",
                        f"c_{label}_gpu",
                        2,
                        [*common, *flags, "--output", str(self.work / "c" / f"{label}-gpu")],
                        "c_gpu",
                        env={"NCCL_DEBUG": "WARN"},
                    )
                starts[f"c_{label}_cpu"] = functools.partial(
                    self.start_generate,
                    "c",
                    f"c_{label}_cpu",
                    2,
                    [
                        *common,
                        *flags,
                        "--device",
                        "cpu",
                        "--output",
                        str(self.work / "c" / f"{label}-cpu"),
                    ],
                    "c_cpu",
                )
        if "b" in parts:
            model_dir = self.work / "sd15"
            build = ["--device", "cuda"] if gpu else ["--device", "cpu", "--small"]
            starts["b_build"] = functools.partial(
                self.start,
                "b",
                "b_build",
                [sys.executable, str(HERE / "gpu_check_build_sd15.py"), str(model_dir), *build],
                TIMEOUTS["b_build"],
            )
        # The longest and the possibly hanging first, so they overlap the most.
        first = ["b_build", "c_tp2_gpu", "c_cfg_parallel_gpu"]
        specs.extend((key, starts[key]) for key in first if key in starts)
        specs.extend((key, start) for key, start in starts.items() if key not in first)

    def _read_correctness(self, parts: list[str], started: dict[str, dict]) -> None:
        gpu = self.mode == "gpu"
        if "a" in parts:
            part = self.results["parts"]["a"]
            stats_out = self.work / "a" / "stats.json"
            if stats_out.exists() and started["a_stats"].get("rc") == 0:
                record = json.loads(stats_out.read_text())
                part["ranks_default_placement"] = [
                    {k: r.get(k) for k in ("rank", "device", "dtype", "cuda_allocated_bytes")}
                    for r in record["cache_stats"]
                ]
            part["models"] = {}
            for model in ("tiny-unet", "tiny-dit"):
                single, double = started[f"a_{model}_nolauncher"], started[f"a_{model}_mpi2"]
                entry = {"nolauncher": brief(single), "mpi2": brief(double)}
                if single.get("rc") == 0 and double.get("rc") == 0:
                    entry["compare"] = compare_dirs(
                        Path(single["output"]) / "images", Path(double["output"]) / "images"
                    )
                    entry["health"] = image_health(Path(single["output"]) / "images")
                part["models"][model] = entry
        if "c" in parts:
            part = self.results["parts"]["c"]
            part["cases"] = {}
            for label, model, _ in PARALLEL_CASES:
                if gpu:
                    part["cases"][f"{label}_gpu"] = classify_refusal(
                        started[f"c_{label}_gpu"], self.logs
                    )
                else:
                    part["cases"][f"{label}_gpu"] = {
                        "status": "skipped",
                        "reason": "no CUDA device on this machine",
                    }
                part["cases"][f"{label}_cpu"] = brief(started[f"c_{label}_cpu"])
                if model == "tiny-unet":  # part d's one-rank images are tiny-unet's
                    part["cases"][f"{label}_cpu"]["output"] = started[f"c_{label}_cpu"].get(
                        "output"
                    )
        if "b" in parts:
            self.b_build_ok = started["b_build"].get("rc") == 0

    def part_b(self) -> None:
        s, gpu = self.sizes, self.mode == "gpu"
        part = self.results["parts"].setdefault(
            "b", {"title": "SD-1.5-size pipeline: plain diffusers vs engine"}
        )
        if not gpu:
            part["note"] = (
                "no GPU: downsized model of the same layout, CPU, tiny sizes; numbers mean nothing"
            )
        model_dir = self.work / "sd15"
        if not getattr(self, "b_build_ok", False):
            part["error"] = "model build failed or did not run"
            return
        part["model"] = json.loads((model_dir / "gpu_check_model.json").read_text())
        prompts = write_items(
            self.work / "b" / "items.jsonl", s["b_items"], "a photograph of a lighthouse", 5000
        )
        size, steps, batch = str(s["b_size"]), str(s["b_steps"]), str(s["b_batch"])
        settings = ["--steps", steps, "--height", size, "--width", size, "--batch-size", batch]
        plain_args = [
            sys.executable,
            str(HERE / "gpu_check_bench.py"),
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--output",
            str(self.work / "b" / "plain"),
            "--guidance",
            "7.5",
            *settings,
        ]
        plain_args += (
            ["--device", "cuda", "--dtype", "float16"]
            if gpu
            else ["--device", "cpu", "--dtype", "float32", "--threads", "1"]
        )
        bench_json = self.work / "b" / "plain" / "bench.json"
        bench_json.unlink(missing_ok=True)
        plain = self.run("b", "b_plain", plain_args, TIMEOUTS["b_plain"])
        if plain.get("rc") == 0 and bench_json.exists():
            part["plain"] = json.loads(bench_json.read_text())
        common = [
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--guidance",
            "7.5",
            *settings,
            "--no-resume",
        ]
        part["engine"] = {}
        for variant, ranks in (("nolauncher", None), ("mpi1", 1), ("mpi2", 2)):
            step = self.generate(
                "b",
                f"b_engine_{variant}",
                ranks,
                [*common, "--output", str(self.work / "b" / variant)],
                "b_engine",
            )
            part["engine"][variant] = brief(step)
            if step.get("rc") == 0:
                part["engine"][variant]["warm_estimate"] = warm_estimate(
                    Path(step["output"]), s["b_batch"]
                )
                if part.get("plain"):
                    part["engine"][variant]["compare_with_plain"] = compare_dirs(
                        self.work / "b" / "plain" / "images", Path(step["output"]) / "images"
                    )
        if part.get("plain"):
            part["health"] = image_health(self.work / "b" / "plain" / "images")
        plain = part.get("plain") or {}
        ratios = {}
        for variant, entry in part["engine"].items():
            ips, warm = (
                entry.get("images_per_second"),
                (entry.get("warm_estimate") or {}).get("images_per_second"),
            )
            for key, base in (
                ("plain_warm", plain.get("images_per_second")),
                ("plain_cold", plain["images"] / plain["cold_seconds"] if plain else None),
                ("plain_pipeline_only", plain.get("pipeline_images_per_second")),
            ):
                if ips and base:
                    ratios[f"{variant}_vs_{key}"] = round(ips / base, 4)
            if warm and plain.get("images_per_second"):
                ratios[f"{variant}_warm_estimate_vs_plain_warm"] = round(
                    warm / plain["images_per_second"], 4
                )
        one, two = (
            part["engine"].get("mpi1", {}).get("images_per_second"),
            part["engine"].get("mpi2", {}).get("images_per_second"),
        )
        if one and two:
            ratios["mpi2_vs_mpi1"] = round(two / one, 4)
        part["ratios"] = ratios

    def part_d(self) -> None:
        s = self.sizes
        part = self.results["parts"].setdefault(
            "d", {"title": f"data-parallel scaling on CPU cores, RPC at {s['rpc_ranks']} ranks"}
        )
        cores = os.cpu_count() or 1
        part["cpu_count"] = cores
        prompts = write_items(
            self.work / "d" / "items.jsonl", s["d_items"], "a scaling test picture", 9000
        )
        common = [
            "--model",
            "tiny-unet",
            "--prompts",
            str(prompts),
            "--steps",
            str(s["d_steps"]),
            "--height",
            str(s["d_size"]),
            "--width",
            str(s["d_size"]),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--no-resume",
        ]
        part["runs"] = {}
        rpc_out = self.work / "d" / "rpc.json"
        rpc_out.unlink(missing_ok=True)
        # What the goals need first (1 and the largest world, the RPC), then the rest, so a
        # tight deadline drops the least useful runs.
        ranks_list = sorted(s["dp_ranks"])
        order = (
            [ranks_list[0], ranks_list[-1], "rpc", *ranks_list[1:-1]]
            if len(ranks_list) > 1
            else ranks_list + ["rpc"]
        )
        for ranks in order:
            if ranks == "rpc":
                step = self.run(
                    "d",
                    f"d_rpc_n{s['rpc_ranks']}",
                    [
                        self.mpiexec,
                        "-n",
                        str(s["rpc_ranks"]),
                        sys.executable,
                        str(HERE / "gpu_check_rpc.py"),
                        "--calls",
                        str(s["rpc_calls"]),
                        "--out",
                        str(rpc_out),
                    ],
                    TIMEOUTS["d_rpc"],
                )
                if step.get("rc") == 0 and rpc_out.exists():
                    record = json.loads(rpc_out.read_text())
                    part["rpc"] = {
                        k: record[k]
                        for k in ("ranks", "executor", "calls_per_round", "rounds_us", "median_us")
                    }
                continue
            step = self.generate(
                "d",
                f"d_n{ranks}",
                ranks,
                [*common, "--output", str(self.work / "d" / f"n{ranks}")],
                "d_gen",
            )
            part["runs"][str(ranks)] = brief(step)
        part["runs"] = dict(sorted(part["runs"].items(), key=lambda kv: int(kv[0])))
        base = part["runs"].get("1", {}).get("images_per_second")
        for ranks, entry in part["runs"].items():
            ips = entry.get("images_per_second")
            if base and ips:
                entry["speedup"] = round(ips / base, 3)
                entry["efficiency"] = round(ips / base / int(ranks), 3)
        if cores < max(s["dp_ranks"]):
            part["note"] = (
                f"only {cores} CPU cores here: runs above {cores} ranks are oversubscribed"
            )

    def finalize(self) -> None:
        """Comparisons that need several parts: part c's CPU images against part d's one rank."""
        reference = self.work / "d" / "n1" / "images"
        for label, entry in self.results["parts"].get("c", {}).get("cases", {}).items():
            output = entry.pop("output", None)
            if label.endswith("_cpu") and entry.get("rc") == 0 and output and reference.exists():
                entry["compare_with_1rank_cpu"] = compare_dirs(
                    reference, Path(output) / "images", only_in_b=True
                )

    # -- output ---------------------------------------------------------------------------------
    def save(self, probe: dict) -> None:
        self.results["probe"] = probe
        self.results["steps"] = self.steps
        self.results["wall_seconds"] = round(time.time() - START, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        summary = render_summary(self.results)
        (self.out / "summary.md").write_text(summary)
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
            for pattern in ("*/*/run.json", "*/*/manifest.jsonl", "*/*/bench.json", "*/*.json"):
                for path in sorted(self.work.glob(pattern)):
                    tar.add(path, arcname=str(path.relative_to(self.work)))
        print("\n" + summary, flush=True)


START = time.time()
# Part c: (label, model, flags) of 2-rank jobs; on one GPU each must be refused (one GPU per
# rank), on the CPU each must run (the tiny-unet ones are compared with part d's one rank).
PARALLEL_CASES = (
    ("tp2", "tiny-unet", ["--tp", "2"]),
    ("cfg_parallel", "tiny-unet", ["--cfg-parallel"]),
    ("ulysses2", "tiny-flux", ["--ulysses", "2"]),
    ("ring2", "tiny-sd3", ["--ring", "2"]),
    ("qwen_cfg_parallel", "tiny-qwen-image", ["--cfg-parallel", "--negative-prompt", "blurry"]),
    ("vae_parallel", "tiny-dit", ["--tp", "2", "--vae-parallel"]),
)


def kill_session(process: subprocess.Popen) -> None:
    """Stop a timed-out command and everything it started (its process session)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def tail(text: str, lines: int) -> str:
    kept = [line for line in text.splitlines() if "it/s]" not in line and "img/s]" not in line]
    return "\n".join(kept[-lines:])


def write_items(path: Path, count: int, prompt: str, seed0: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for index in range(count):
            handle.write(
                json.dumps(
                    {
                        "id": f"item{index:04d}",
                        "prompt": f"{prompt} number {index}",
                        "seed": seed0 + index,
                    }
                )
                + "\n"
            )
    return path


def read_run_json(output: Path) -> dict:
    path = output / "run.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    totals = record.get("totals", {})
    found = {
        "run_status": record.get("status"),
        "images_ok": totals.get("images_ok"),
        "images_failed": totals.get("images_failed"),
        "images_per_rank": totals.get("images_per_rank"),
        "gen_seconds": record.get("seconds"),
        "layout": record.get("layout"),
    }
    if record.get("seconds") and totals.get("images_ok"):
        found["images_per_second"] = round(totals["images_ok"] / record["seconds"], 4)
    manifest = output / "manifest.jsonl"
    if manifest.exists():
        errors = [
            json.loads(line).get("error")
            for line in manifest.read_text().splitlines()
            if line.strip()
        ]
        errors = [e for e in errors if e]
        if errors:
            found["first_item_error"] = errors[0][:600]
    return found


def devices_seen(log: Path) -> list[str]:
    """The devices the workers said they loaded on ("loaded X on cuda:0 in 1.2 s")."""

    if not log.exists():
        return []
    return sorted(set(re.findall(r"loaded \w+ on (\S+) in", log.read_text(errors="replace"))))


def warm_estimate(output: Path, batch: int) -> dict | None:
    """run.json's seconds less what each replica's first (cold) batch cost over a warm batch.

    The manifest gives every image's share of its batch's pipeline time and the rank that
    made it, in the order results arrived; items form batches of ``batch`` in id order.
    An estimate: the engine has no warm-up, the plain loop's rate excludes its warm-up. For
    one replica only (with several, the first batches overlap and no single excess applies).
    """

    manifest, run_json = output / "manifest.jsonl", output / "run.json"
    if not manifest.exists() or not run_json.exists():
        return None
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("status") == "ok"]
    position = {item_id: index for index, item_id in enumerate(sorted({row["id"] for row in rows}))}
    batches: dict[int, dict] = {}
    for order, row in enumerate(rows):
        entry = batches.setdefault(
            position[row["id"]] // batch, {"rank": row["rank"], "seconds": 0.0, "order": order}
        )
        entry["seconds"] += row["seconds"]
    if len({row["rank"] for row in rows}) != 1:
        return None
    first: dict[int, float] = {}
    rest = []
    for entry in sorted(batches.values(), key=lambda e: e["order"]):
        if entry["rank"] in first:
            rest.append(entry["seconds"])
        else:
            first[entry["rank"]] = entry["seconds"]
    if not rest:
        return None
    warm = statistics.median(rest)
    excess = max(0.0, max(first.values()) - warm)
    seconds = json.loads(run_json.read_text())["seconds"] - excess
    return {
        "first_batch_s": {str(k): round(v, 3) for k, v in first.items()},
        "warm_batch_s": round(warm, 3),
        "cold_excess_s": round(excess, 3),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(rows) / seconds, 4) if seconds > 0 else None,
    }


def brief(step: dict) -> dict:
    keys = (
        "status",
        "rc",
        "seconds",
        "timed_out",
        "gen_seconds",
        "images_ok",
        "images_failed",
        "images_per_second",
        "images_per_rank",
        "device_seen",
        "first_item_error",
        "reason",
    )
    return {k: step[k] for k in keys if k in step}


def load_rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def compare_dirs(a: Path, b: Path, only_in_b: bool = False) -> dict:
    """Byte equality and the largest pixel difference of same-named PNGs."""
    names_a = {p.name for p in a.glob("*.png")}
    names_b = {p.name for p in b.glob("*.png")}
    names = sorted(names_b if only_in_b else names_a | names_b)
    result = {
        "images": len(names),
        "missing": sorted(n for n in names if n not in names_a or n not in names_b),
        "byte_identical": 0,
        "max_pixel_diff": 0,
        "images_differing": 0,
    }
    for name in names:
        if name in result["missing"]:
            continue
        if (a / name).read_bytes() == (b / name).read_bytes():
            result["byte_identical"] += 1
            continue
        diff = int(abs(load_rgb(a / name) - load_rgb(b / name)).max())
        result["max_pixel_diff"] = max(result["max_pixel_diff"], diff)
        result["images_differing"] += diff > 0
    return result


def image_health(directory: Path) -> dict:
    """Flat images (every pixel the same: NaN/inf in fp16 decode to black) and the pixel spread."""
    stds = [float(load_rgb(path).std()) for path in sorted(directory.glob("*.png"))]
    return {
        "images": len(stds),
        "flat_images": sum(s == 0.0 for s in stds),
        "min_std": round(min(stds), 2) if stds else None,
    }


def classify_refusal(step: dict, logs: Path) -> dict:
    """What happened to a job that cannot run (two NCCL ranks on one GPU)."""
    entry = brief(step)
    if step.get("status") == "skipped":
        return entry
    text = (logs / f"{step['name']}.log").read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ranked = (
        [line for line in lines if line.startswith("error:")]
        + [
            line
            for line in lines
            if any(
                k in line
                for k in ("Duplicate GPU", "ncclInvalidUsage", "NCCL error", "DistBackendError")
            )
        ]
        + [line for line in lines if "Error" in line or "refus" in line.lower()]
    )
    entry["message"] = (ranked[0] if ranked else (lines[-1] if lines else ""))[:600]
    entry["traceback_printed"] = step.get("traceback", False)
    if step.get("timed_out"):
        entry["outcome"] = "HANG (killed at the timeout)"
    elif step.get("rc") == 0:
        entry["outcome"] = "ran (no refusal)"
    elif step.get("rc") == 3:
        entry["outcome"] = "ran, every item failed (exit 3): not refused"
        entry["message"] = step.get("first_item_error") or entry["message"]
    elif any(line.startswith("error:") for line in lines):
        extra = ", with a traceback printed too" if step.get("traceback") else ""
        entry["outcome"] = f"stopped with an error line (exit {step.get('rc')}{extra})"
    else:
        entry["outcome"] = (
            f"crashed (exit {step.get('rc')}"
            f"{', traceback' if step.get('traceback') else ''}), no error line"
        )
    return entry


def fmt(value, spec: str = "") -> str:
    if value is None or value == "":
        return "-"
    return format(value, spec) if spec else str(value)


def render_summary(results: dict) -> str:
    probe, parts = results.get("probe", {}), results["parts"]
    lines = [
        f"# GPU check ({results['mode']})",
        "",
        f"- date: {probe.get('date', '-')}; device: {probe.get('gpu', 'none')}; "
        f"CPU cores: {os.cpu_count()}",
        f"- versions: {json.dumps(probe.get('versions', {}))}",
        f"- MPI: {probe.get('mpi', '-')}",
        f"- gpu_check.py wall time: {results['wall_seconds']} s",
        "",
    ]
    a = parts.get("a")
    if a:
        lines += [f"## (a) {a['title']}", ""]
        if a.get("note"):
            lines += [f"_{a['note']}_", ""]
        if a.get("ranks_default_placement"):
            lines += [
                "Default placement (--device auto, --dtype auto) under mpiexec -n 2, "
                f"from get_cache_stats: {json.dumps(a['ranks_default_placement'])}",
                "",
            ]
        lines += [
            "| model | no launcher img/s | mpiexec -n 2 img/s | images per rank (n=2) "
            "| byte-identical | max pixel diff | flat images | device |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model, entry in a.get("models", {}).items():
            one, two, cmp_, health = (
                entry["nolauncher"],
                entry["mpi2"],
                entry.get("compare", {}),
                entry.get("health", {}),
            )
            lines.append(
                f"| {model} | {fmt(one.get('images_per_second'))} ({one.get('status')}) | "
                f"{fmt(two.get('images_per_second'))} ({two.get('status')}) | "
                f"{fmt(two.get('images_per_rank'))} | "
                f"{fmt(cmp_.get('byte_identical'))}/{fmt(cmp_.get('images'))} | "
                f"{fmt(cmp_.get('max_pixel_diff'))} | {fmt(health.get('flat_images'))} | "
                f"{','.join(one.get('device_seen', []) + two.get('device_seen', []))} |"
            )
        lines.append("")
    b = parts.get("b")
    if b:
        lines += [f"## (b) {b['title']}", ""]
        if b.get("note"):
            lines += [f"_{b['note']}_", ""]
        if b.get("model"):
            m = b["model"]
            lines += [
                f"Model: {m['layout']}, {m['dtype']}, parameters {json.dumps(m['parameters'])}, "
                f"built in {m['total_seconds']} s on {m['built_on']}.",
                "",
            ]
        plain = b.get("plain") or {}
        lines += [
            "Throughput excludes model load. Plain loop: its batches after one warm-up batch, "
            "PNGs saved after each batch (`cold` adds back what the first batch cost over a warm "
            "one; `pipeline only` leaves the PNG saving out). Engine rows: run.json `seconds` "
            "(engine ready to last image written; the first batch is cold: no warm-up); "
            "`warm est.` takes out what each replica's first batch cost over a warm batch "
            "(from the manifest).",
            "",
            "| variant | images | seconds | img/s | vs plain (warm) | vs plain (cold) "
            "| vs plain (pipeline only) | warm est. img/s (vs plain warm) | images per rank "
            "| max pixel diff vs plain | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        if plain:
            lines.append(
                f"| plain diffusers loop | {plain['images']} | {plain['seconds']} "
                f"(cold {plain['cold_seconds']}, PNG saves {fmt(plain.get('save_seconds'))}) | "
                f"{plain['images_per_second']} "
                f"(pipeline only {fmt(plain.get('pipeline_images_per_second'))}) | "
                f"1 | - | - | - | - | - | "
                f"load {plain['load_seconds']} + warm-up {plain['warmup_seconds']} |"
            )
        names = {
            "nolauncher": "omni-diffuse, no launcher",
            "mpi1": "mpiexec -n 1",
            "mpi2": "mpiexec -n 2 (2 replicas, 1 device)",
        }
        for variant, entry in b.get("engine", {}).items():
            ratios, warm = b.get("ratios", {}), entry.get("warm_estimate") or {}
            lines.append(
                f"| {names[variant]} | {fmt(entry.get('images_ok'))} | "
                f"{fmt(entry.get('gen_seconds'))} | {fmt(entry.get('images_per_second'))} | "
                f"{fmt(ratios.get(f'{variant}_vs_plain_warm'))} | "
                f"{fmt(ratios.get(f'{variant}_vs_plain_cold'))} | "
                f"{fmt(ratios.get(f'{variant}_vs_plain_pipeline_only'))} | "
                f"{fmt(warm.get('images_per_second'))} "
                f"({fmt(ratios.get(f'{variant}_warm_estimate_vs_plain_warm'))}) | "
                f"{fmt(entry.get('images_per_rank'))} | "
                f"{fmt(entry.get('compare_with_plain', {}).get('max_pixel_diff'))} | "
                f"{fmt(entry.get('seconds'))} ({entry.get('status')}) |"
            )
        lines += [
            "",
            "2 replicas vs 1 on one GPU (mpiexec -n 2 / -n 1): "
            f"{fmt(b.get('ratios', {}).get('mpi2_vs_mpi1'))}; "
            f"flat images in the plain run: {fmt((b.get('health') or {}).get('flat_images'))}",
            "",
        ]
    d = parts.get("d")
    if d:
        lines += [f"## (d) {d['title']}", ""]
        if d.get("note"):
            lines += [f"_{d['note']}_", ""]
        lines += [
            "| ranks | images | seconds | img/s | speed-up | efficiency | images per rank |",
            "|---|---|---|---|---|---|---|",
        ]
        for ranks, entry in d.get("runs", {}).items():
            lines.append(
                f"| {ranks} | {fmt(entry.get('images_ok'))} | {fmt(entry.get('gen_seconds'))} | "
                f"{fmt(entry.get('images_per_second'))} | {fmt(entry.get('speedup'))} | "
                f"{fmt(entry.get('efficiency'))} | {fmt(entry.get('images_per_rank'))} "
                f"({entry.get('status')}) |"
            )
        rpc = d.get("rpc")
        lines += [
            "",
            f"collective_rpc('ping') at {rpc['ranks']} ranks ({rpc['executor']}): "
            f"median {rpc['median_us']} us per call (rounds {rpc['rounds_us']})"
            if rpc
            else "RPC round trip: not measured (see steps)",
            "",
        ]
    c = parts.get("c")
    if c:
        lines += [
            f"## (c) {c['title']}",
            "",
            "| case | outcome | exit | seconds | message / result |",
            "|---|---|---|---|---|",
        ]
        for case, entry in c.get("cases", {}).items():
            if entry.get("status") == "skipped":
                lines.append(f"| {case} | skipped | - | - | {entry.get('reason')} |")
            elif case.endswith("_gpu"):
                lines.append(
                    f"| {case} | {entry.get('outcome')} | {fmt(entry.get('rc'))} | "
                    f"{fmt(entry.get('seconds'))} | {entry.get('message', '').replace('|', '/')} |"
                )
            else:
                cmp_ = entry.get("compare_with_1rank_cpu", {})
                lines.append(
                    f"| {case} | {entry.get('status')} | {fmt(entry.get('rc'))} | "
                    f"{fmt(entry.get('seconds'))} | {fmt(entry.get('images_ok'))} images; "
                    f"vs 1-rank CPU: {fmt(cmp_.get('byte_identical'))}/"
                    f"{fmt(cmp_.get('images'))} byte-identical, "
                    f"max pixel diff {fmt(cmp_.get('max_pixel_diff'))} |"
                )
        lines.append("")
    for error in results.get("errors", []):
        lines += [f"ERROR in the check itself: {error}", ""]
    lines += ["## Steps", "", "| step | status | exit | seconds |", "|---|---|---|---|"]
    for step in results["steps"]:
        lines.append(
            f"| {step['name']} | {step.get('status')}"
            f"{' (' + step['reason'] + ')' if step.get('reason') else ''} | "
            f"{fmt(step.get('rc'))} | {fmt(step.get('seconds'))} |"
        )
    return "\n".join(lines) + "\n"


def probe_environment(checker: Checker) -> dict:
    code = (
        "import json, sys, time, torch, diffusers, transformers, mpi4py\n"
        "info = {'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'python': sys.version.split()[0],\n"
        "        'versions': {'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'diffusers': diffusers.__version__,\n"
        "                     'transformers': transformers.__version__, "
        "'mpi4py': mpi4py.__version__},\n"
        "        'cuda_available': torch.cuda.is_available()}\n"
        "try:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info['gpu'] = f'{p.name}, {p.total_memory / 2**30:.1f} GiB, "
        "{torch.cuda.device_count()} device(s)'\n"
        "    info['versions']['nccl'] = str(torch.cuda.nccl.version())\n"
        "except Exception as exc:\n"
        "    info['gpu_error'] = repr(exc)\n"
        "try:\n"
        "    from mpi4py import MPI\n"
        "    info['mpi'] = MPI.Get_library_version().splitlines()[0].strip()\n"
        "except Exception as exc:\n"
        "    info['mpi'] = repr(exc)\n"
        "print('PROBE ' + json.dumps(info))\n"
    )
    step = checker.run(
        "setup",
        "probe",
        [sys.executable, "-c", code],
        TIMEOUTS["probe"],
        display=f"{sys.executable} -c <probe: versions, GPU, MPI library>",
    )
    for line in (checker.logs / "probe.log").read_text(errors="replace").splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": step.get("tail", "")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="smoke sizes on the CPU even if a GPU is there"
    )
    parser.add_argument(
        "--parts",
        default="a,b,c,d",
        help="which parts (a, c and the model build run first, "
        "concurrently; then b's timings, then d)",
    )
    parser.add_argument("--dp-ranks", default=None, help="comma list for part d (default 1,2,4,8)")
    parser.add_argument("--rpc-ranks", type=int, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for stale in ("a", "b", "c", "d", "logs"):  # a rerun on the same machine compares nothing old
        shutil.rmtree(args.work / stale, ignore_errors=True)
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE") or (time.time() + 420))
    checker = Checker(args.out, args.work, "cpu-smoke", deadline, {})
    probe = probe_environment(checker)
    if (
        "cuda_available" not in probe
    ):  # the probe itself failed: ask the one question that decides the mode
        check = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        probe["cuda_available"] = check.stdout.strip() == "True"
    mode = "gpu" if probe.get("cuda_available") and not args.cpu_smoke else "cpu-smoke"
    sizes = dict(SIZES[mode])
    if args.dp_ranks:
        sizes["dp_ranks"] = [int(r) for r in args.dp_ranks.split(",")]
    if args.rpc_ranks:
        sizes["rpc_ranks"] = args.rpc_ranks
    checker.mode, checker.sizes = mode, sizes
    checker.results.update(mode=mode, sizes=sizes)
    reason = (
        ""
        if mode == "gpu"
        else (
            " (--cpu-smoke)"
            if args.cpu_smoke
            else " (no usable CUDA device: GPU steps are skipped, CPU stand-ins run)"
        )
    )
    print(f"== mode: {mode}{reason}; {checker.remaining():.0f} s to the deadline", flush=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    phases = [("a, c and the model build, concurrently", lambda: checker.phase_correctness(parts))]
    if "b" in parts:
        phases.append(("b: plain diffusers vs engine", checker.part_b))
    if "d" in parts:
        phases.append(("d: CPU data-parallel scaling and RPC", checker.part_d))
    phases.append(("comparisons", checker.finalize))
    for title, phase in phases:
        print(f"\n== {title} ({checker.remaining():.0f} s to the deadline)", flush=True)
        try:
            phase()
        except Exception as exc:  # noqa: BLE001 - record and go on to the next phase
            checker.results.setdefault("errors", []).append(f"{title}: {exc!r}")
            traceback.print_exc()
    checker.save(probe)
    failed = [s["name"] for s in checker.steps if s.get("status") not in ("ok", "skipped")]
    expected_fail = {
        f"c_{label}_gpu" for label, _, _ in PARALLEL_CASES
    }  # refusals are the expected outcome there
    return 1 if [name for name in failed if name not in expected_fail] else 0


if __name__ == "__main__":
    sys.exit(main())
