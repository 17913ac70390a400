"""The output path of ``omni-diffuse generate`` alone: images/s at 1, 2 and 4 ranks when the
pipeline costs nothing.

    python scripts/bench_output.py [--images 64] [--size 1024] [--repeats 3] [--ranks 1,2,4]
                                   [--batch-size 2] [--json out.json]

A stand-in pipeline returns ready ``--size`` x ``--size`` RGB PIL images instantly: a few
1/f-spectrum ("pink noise") bases with mild pixel noise, precomputed once by this script
(their PNG encode cost is like a photo's; the table prints what one costs here), rolled and
flipped per seed so that every output file differs. Everything else is the real job:
``mpiexec -n K python scripts/bench_output.py --rank-main -- generate --model tiny-unet ...``
patches the pipeline loader on every rank, then calls the package's own CLI entry point, so
batching, scheduling, moving outputs to whoever writes them, PNG encoding, atomic writes,
the manifest and ``run.json`` are what today's code does. ``--model tiny-unet`` only passes the
CLI's model check; the loader is patched, so no model is ever loaded.

Reported per configuration (median over ``--repeats``, the configurations interleaved within
each repeat so machine noise hits all alike): images/s from ``run.json`` (``images_per_second``:
images over ``seconds``, which starts after every rank has loaded and ends after the
contact sheet and ``run.json``), images/s of the generate phase alone (first pipeline call on
any rank to the last image file written), the wall-clock of the whole ``mpiexec``
(start-up included), and rank 0's peak resident memory (pixels waiting for rank 0 pile up
there). Ratios are against the first entry of ``--ranks``. Torch and BLAS
use one thread per rank (``OMP_NUM_THREADS=1``); ranks beyond the core count oversubscribe.

``--batch-size`` defaults to 2, not 4: on the code of 2026-11-27 (commit 39ede44) a replica
other than rank 0 posts each batch's output, pickled with its raw pixels, into rank 0's
``TCPStore``, whose libuv server refuses any value over 8 MiB ("Invalid payload size ...
max: 8388608") and drops the connection; four 1024x1024 RGB images are 12 MiB, so every
job of 2 ranks or more died (exit 1, "Broken pipe" on rank 1). Two images (6 MiB) fit.
Compare before and after at the same ``--batch-size``.

The loader patch is written to survive a reorganised package: every one of
``spmd_diffusion.worker``, ``spmd_diffusion.worker.diffusion_worker``, ``spmd_diffusion.models``
and ``spmd_diffusion.worker.models`` that imports and has a ``load_pipeline`` gets it
replaced (and so does any other loaded ``spmd_diffusion`` module bound to the same original
function), and the CLI entry is ``spmd_diffusion.cli.main`` or
``spmd_diffusion.entrypoints.cli.main``, whichever exists. The repository holding this script
goes first on ``sys.path``, so a worktree benchmarks its own code.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL, numpy); project modules load where
# used (spmd_diffusion): they pull in heavy modules or import back into this one

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASES_ENV = "BENCH_OUTPUT_BASES"  # .npy file of the precomputed bases (uint8, n x H x W x 3)
STAMPS_ENV = (
    "BENCH_OUTPUT_STAMPS"  # directory: each rank writes the time of its first pipeline call
)
LOADER_MODULES = (
    "spmd_diffusion.worker",
    "spmd_diffusion.worker.diffusion_worker",
    "spmd_diffusion.models",
    "spmd_diffusion.worker.models",
)
CLI_MODULES = ("spmd_diffusion.cli", "spmd_diffusion.entrypoints.cli")

# Amplitude spectrum ~ 1/f^ALPHA plus Gaussian pixel noise of NOISE levels: with these, a
# 1024x1024 base encodes in ~210-260 ms on the benchmark VM, inside the 140-340 ms that real
# 1024x1024 photos take there (natural images have ALPHA ~ 0.8-1.5).
ALPHA, NOISE, BASES = 1.25, 2.0, 4


# -- the stand-in images ---------------------------------------------------------------------
def make_bases(size: int, count: int = BASES, seed: int = 0) -> Any:
    """``count`` periodic 1/f-noise RGB images (channels correlated, like a photo's)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    bases = np.empty((count, size, size, 3), dtype=np.uint8)
    for index in range(count):
        channels = []
        for _ in range(3):
            spectrum = (
                rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)
            ) / radius**ALPHA
            spectrum[0, 0] = 0
            channels.append(np.fft.irfft2(spectrum, s=(size, size)))
        field = np.stack(channels, axis=-1)
        field = 0.6 * field.mean(axis=-1, keepdims=True) + 0.4 * field
        field = (field - field.mean()) / field.std()
        pixels = 128 + 48 * field + rng.normal(scale=NOISE, size=field.shape)
        bases[index] = np.clip(pixels, 0, 255).astype(np.uint8)
    return bases


def variant(bases: Any, seed: int) -> Any:
    """The image of ``seed``: a base rolled (the bases are periodic: no seam) and flipped."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = bases[seed % len(bases)]
    dy, dx = (int(v) for v in rng.integers(0, base.shape[0], size=2))
    pixels = np.roll(base, (dy, dx), axis=(0, 1))
    flip = int(rng.integers(0, 4))
    if flip & 1:
        pixels = pixels[::-1]
    if flip & 2:
        pixels = pixels[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def png_encode(image: Any) -> bytes:
    """What the job does per image (``spmd_diffusion.images.png_bytes``: PIL's PNG defaults)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class StandInPipeline:
    """Enough of a diffusers pipeline for the worker; ``__call__`` returns at once."""

    vae_scale_factor = 8

    def __init__(self, bases: Any, stamps: str | None) -> None:
        self.bases = bases
        self.stamps = stamps
        sample_size = (
            bases.shape[1] // self.vae_scale_factor
        )  # the worker's default size: the bases'
        self.unet = SimpleNamespace(config=SimpleNamespace(sample_size=sample_size))
        self.components: dict[str, Any] = {}
        self._stamped = False

    def to(self, *args: Any, **kwargs: Any) -> StandInPipeline:
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def __call__(
        self,
        prompt: Any = None,
        negative_prompt: Any = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 2,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        callback_on_step_end: Any = None,
        output_type: str = "pil",
    ) -> SimpleNamespace:
        if not self._stamped and self.stamps:
            self._stamped = True
            Path(self.stamps, f"first_call.{os.getpid()}").write_text(repr(time.time()))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        size = self.bases.shape[1]
        if (height or size) != size or (width or size) != size:
            raise ValueError(f"the stand-in makes {size}x{size} images only, not {height}x{width}")
        count = len(prompts) * num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator] * count
        seeds = [g.initial_seed() if g is not None else i for i, g in enumerate(generators[:count])]
        for step in range(num_inference_steps):  # an instant "step": where rank 0 polls today
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 0, {})
        return SimpleNamespace(images=[variant(self.bases, seed) for seed in seeds])


# -- rank-main mode: one rank of the job ------------------------------------------------------
def patch_loader(pipeline: Any) -> list[str]:
    """Make every ``load_pipeline`` the package binds return ``pipeline``; the patched names."""

    def load_pipeline(*args: Any, **kwargs: Any) -> Any:
        return pipeline

    originals, patched = [], []
    for name in LOADER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "load_pipeline"):
            originals.append(module.load_pipeline)
            module.load_pipeline = load_pipeline
            patched.append(name)
    for name, module in list(sys.modules.items()):  # anything else that bound the same function
        if name.startswith("spmd_diffusion") and name not in patched:
            if any(getattr(module, "load_pipeline", None) is original for original in originals):
                module.load_pipeline = load_pipeline
                patched.append(name)
    return patched


def cli_main() -> Any:
    for name in CLI_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "main"):
            return module.main
    raise SystemExit(f"no CLI entry point in {CLI_MODULES}")


def rank_main(cli_args: list[str]) -> None:
    import numpy as np

    sys.path.insert(0, str(REPO))
    bases = np.load(os.environ[BASES_ENV])
    patched = patch_loader(StandInPipeline(bases, os.environ.get(STAMPS_ENV)))
    if not patched:
        raise SystemExit(f"found no load_pipeline to patch in {LOADER_MODULES}")
    main = cli_main()
    if os.environ.get(STAMPS_ENV):
        import spmd_diffusion

        stamps = Path(os.environ[STAMPS_ENV])
        names = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK")
        rank = next((os.environ[name] for name in names if name in os.environ), "0")

        def peak_memory() -> None:  # KiB on Linux: what this rank held at its worst
            (stamps / f"rss.{rank}").write_text(
                str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            )

        atexit.register(peak_memory)

        found = {
            "patched": patched,
            "cli": f"{main.__module__}.main",
            "package": spmd_diffusion.__file__,
        }
        (stamps / f"patch.{os.getpid()}").write_text(json.dumps(found))
    main(cli_args)


# -- the driver -------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_head() -> str:
    """HEAD's short hash, ``+dirty`` when the package itself has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "spmd_diffusion"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def encode_times(bases: Any, count: int = 8) -> list[float]:
    """Seconds to PNG-encode one stand-in image, single core, ``count`` different images."""
    times = []
    for seed in range(count):
        image = variant(bases, 1000 + seed)
        start = time.perf_counter()
        png_encode(image)
        times.append(time.perf_counter() - start)
    return times


def run_once(
    ranks: int, workdir: Path, prompts: Path, bases_file: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One ``mpiexec -n ranks`` job; its numbers, after checking every image was written."""
    output = workdir / f"out-{ranks}"
    stamps = workdir / f"stamps-{ranks}"
    for directory in (output, stamps):
        if directory.exists():
            subprocess.run(["rm", "-rf", str(directory)], check=True)
    stamps.mkdir(parents=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SPMD_DIFFUSION_LOG_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
        BASES_ENV: str(bases_file),
        STAMPS_ENV: str(stamps),
    }
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
        "--no-resume",
    ]
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
        if "Invalid payload size" in done.stderr:
            raise SystemExit(
                f"{ranks} rank(s): exit {done.returncode}: one batch's pickled output is larger "
                "than rank 0's TCPStore accepts (8 MiB); use a smaller --batch-size or --size"
            )
        raise SystemExit(f"{ranks} rank(s): exit {done.returncode}")
    record = json.loads((output / "run.json").read_text())
    images = sorted((output / "images").glob("*.png"))
    if record["totals"]["images_ok"] != args.images or len(images) != args.images:
        raise SystemExit(
            f"{ranks} rank(s): {record['totals']['images_ok']} ok, {len(images)} files, "
            f"{args.images} planned"
        )
    first_call = min(float(p.read_text()) for p in stamps.glob("first_call.*"))
    last_write = max(p.stat().st_mtime for p in images)
    patch = json.loads(next(stamps.glob("patch.*")).read_text())
    rss = {p.name.split(".", 1)[1]: int(p.read_text()) // 1024 for p in stamps.glob("rss.*")}
    sizes = [p.stat().st_size for p in images]
    return {
        "ranks": ranks,
        "images": record["totals"]["images_ok"],
        "run_json_seconds": record["seconds"],
        "run_json_images_per_second": record["images_per_second"],
        "phase_seconds": round(last_write - first_call, 3),
        "phase_images_per_second": round(args.images / (last_write - first_call), 4),
        "wall_seconds": round(wall, 3),
        "images_per_rank": record["totals"]["images_per_rank"],
        "peak_rss_mib": dict(sorted(rss.items(), key=lambda kv: int(kv[0]))),
        "rank0_peak_rss_mib": rss.get("0"),
        "distinct_files": len({p.read_bytes() for p in images[:16]}),
        "mean_png_bytes": int(statistics.mean(sizes)),
        "patch": patch,
    }


def main() -> None:
    if "--rank-main" in sys.argv[1:]:
        rest = sys.argv[sys.argv.index("--rank-main") + 1 :]
        rank_main(rest[1:] if rest[:1] == ["--"] else rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="prompts (one image each)")
    parser.add_argument("--size", type=int, default=1024, help="image height and width")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="images per batch (default 2: see the module docstring for why not 4)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ranks", default="1,2,4", help="comma-separated rank counts; ratios are against the first"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per job")
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()
    ranks_list = [int(r) for r in args.ranks.split(",")]
    import numpy as np

    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "commit": git_head(),
        "date": date.today().isoformat(),
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "ranks": ranks_list,
        "stand_in": {"alpha": ALPHA, "noise": NOISE, "bases": BASES},
    }
    info["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_output-") as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        bases = make_bases(args.size)
        print(
            f"stand-in bases: {BASES} of {args.size}x{args.size} "
            f"in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
        bases_file = workdir / "bases.npy"
        np.save(bases_file, bases)
        encode = encode_times(bases)
        info["png_encode_ms"] = {
            "median": round(1000 * statistics.median(encode), 1),
            "min": round(1000 * min(encode), 1),
            "max": round(1000 * max(encode), 1),
        }
        prompts = workdir / "prompts.txt"
        prompts.write_text("".join(f"benchmark prompt number {i}\n" for i in range(args.images)))
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            shift = repeat % len(
                ranks_list
            )  # rotate the order too: no configuration always goes first
            for ranks in ranks_list[shift:] + ranks_list[:shift]:
                result = run_once(ranks, workdir, prompts, bases_file, args)
                result["repeat"] = repeat
                runs.append(result)
                print(
                    f"repeat {repeat} ranks {ranks}: "
                    f"{result['run_json_images_per_second']:.2f} img/s (run.json), "
                    f"{result['phase_images_per_second']:.2f} img/s (generate phase), "
                    f"wall {result['wall_seconds']:.1f} s, "
                    f"images per rank {result['images_per_rank']}, "
                    f"peak RSS MiB per rank {result['peak_rss_mib']}",
                    file=sys.stderr,
                )
    info["runs"] = runs
    info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    summary = {}
    for ranks in ranks_list:
        mine = [r for r in runs if r["ranks"] == ranks]
        summary[ranks] = {
            key: statistics.median(r[key] for r in mine)
            for key in (
                "run_json_images_per_second",
                "phase_images_per_second",
                "wall_seconds",
                "rank0_peak_rss_mib",
            )
        }
        summary[ranks]["values"] = [r["run_json_images_per_second"] for r in mine]
    base = summary[ranks_list[0]]
    for ranks in ranks_list:
        mine = summary[ranks]
        mine["ratio"] = mine["run_json_images_per_second"] / base["run_json_images_per_second"]
        mine["phase_ratio"] = mine["phase_images_per_second"] / base["phase_images_per_second"]
    info["summary"] = {str(k): v for k, v in summary.items()}

    m = info["machine"]
    print(
        f"\nbench_output: {args.images} images of {args.size}x{args.size}, "
        f"--batch-size {args.batch_size}, "
        f"median of {args.repeats} interleaved repeats, OMP_NUM_THREADS=1"
    )
    print(f"command: {info['command']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; commit {info['commit']}; "
        f"{info['date']}"
    )
    print(
        f"load average (1/5/15 min) before: {info['load_average_before']}, "
        f"after: {info['load_average_after']} (other work on the machine shows here)"
    )
    patch = runs[0]["patch"]
    print(
        f"package: {patch['package']}; loader patched in {', '.join(patch['patched'])}; "
        f"CLI {patch['cli']}"
    )
    e = info["png_encode_ms"]
    print(
        f"PNG encode of one stand-in image, one core: {e['median']} ms median "
        f"({e['min']}-{e['max']} ms over 8), "
        f"{runs[0]['mean_png_bytes'] / 2**20:.2f} MiB per file"
    )
    print()
    print(
        f"| ranks | img/s (run.json) | per repeat | img/s (generate phase) | wall s (mpiexec) | "
        f"ratio vs {ranks_list[0]} (run.json) | ratio (phase) | rank 0 peak RSS MiB |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for ranks in ranks_list:
        s = summary[ranks]
        values = ", ".join(f"{v:.2f}" for v in s["values"])
        print(
            f"| {ranks} | {s['run_json_images_per_second']:.2f} | {values} | "
            f"{s['phase_images_per_second']:.2f} | {s['wall_seconds']:.1f} | "
            f"{s['ratio']:.2f}x | {s['phase_ratio']:.2f}x | "
            f"{s['rank0_peak_rss_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
