"""``omni-diffuse``: the command line (``python -m spmd_diffusion`` is the same).

Exit codes: 0 success; 1 a fatal fault; 2 bad input or usage, reported before any model is
loaded; 3 (``generate``) the job finished but some items failed (see the manifest); 130
interrupted (Ctrl-C); 143 terminated (SIGTERM, e.g. Slurm's time limit or scancel). The
launcher may put its own in their place (README, "Errors"): torchrun 1; mpiexec the number
of the signal that killed a rank (9), or 137 when mpiexec itself is killed.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import tomllib

from spmd_diffusion import __version__
from spmd_diffusion.data import DEFAULT_MODEL, DTYPES, OmniDiffusionConfig
from spmd_diffusion.distributed.launcher import detect_launcher
from spmd_diffusion.errors import Terminated, interrupt_exit_code
from spmd_diffusion.exit_codes import EXIT_FATAL, EXIT_OK
from spmd_diffusion.models.tiny.families import BUILDERS as TINY_BUILDERS
from spmd_diffusion.request_settings import FLAG_SETTINGS, Setting

logger = logging.getLogger("spmd_diffusion.entrypoints.cli")


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options every model-loading command shares; they become an OmniDiffusionConfig."""
    options = [
        click.option(
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            help="Pipeline directory, hub id, or an embedded tiny model: tiny-unet, tiny-sdxl, tiny-dit, "
            "tiny-sd3, tiny-flux, tiny-qwen-image, tiny-sana, tiny-video, tiny-ltx.",
        ),
        click.option(
            "--model-class-name",
            default=None,
            help="diffusers pipeline class to load with (default: from model_index.json).",
        ),
        click.option(
            "--executor",
            "executor_class",
            default=None,
            help="Executor: mp, uni, ray, a registered name, or a dotted path (default: by launcher).",
        ),
        click.option(
            "--num-gpus",
            default=1,
            show_default=True,
            type=int,
            help="Workers of the mp and ray executors (without a launcher): one per GPU, or CPU workers.",
        ),
        click.option(
            "--dtype",
            default="auto",
            show_default=True,
            type=click.Choice(list(DTYPES)),
            help="Weights dtype; auto is float16 on GPUs, float32 on CPUs.",
        ),
        click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
        ),
        click.option(
            "--seed",
            default=0,
            show_default=True,
            type=int,
            help="Run seed: items without their own seed derive theirs from it and their id.",
        ),
        click.option(
            "--batch-size",
            "max_batch_size",
            default=4,
            show_default=True,
            type=click.IntRange(min=1),
            help="Most images in one pipeline call (generate: prompts per batch; a batch is one "
            "pipeline call of batch-size x images-per-prompt images).",
        ),
        click.option(
            "--threads",
            "torch_num_threads",
            default=None,
            type=click.IntRange(min=1),
            help="torch intra-op threads per rank (CPU default: 1, for layout-independent results).",
        ),
        click.option(
            "--max-image-size",
            default=4096,
            show_default=True,
            type=click.IntRange(min=8),
            help="Largest height or width a request may ask for.",
        ),
        click.option(
            "--max-steps",
            "max_inference_steps",
            default=1000,
            show_default=True,
            type=click.IntRange(min=1),
            help="Most denoising steps a request may ask for.",
        ),
        click.option(
            "--max-images-per-prompt",
            default=64,
            show_default=True,
            type=click.IntRange(min=1),
            help="Most images one prompt may ask for.",
        ),
        click.option(
            "--schedule",
            default="shape",
            show_default=True,
            metavar="POLICY",
            help="Which batch a free replica gets: fifo, shape (same-shape work together), cost "
            "(longest first), or a dotted path to your own policy class.",
        ),
        click.option(
            "--startup-timeout",
            default=900.0,
            show_default=True,
            type=click.FloatRange(min=1),
            help="Seconds every rank may take to load the model (and join its groups).",
        ),
        click.option(
            "--batch-timeout",
            default=None,
            type=click.FloatRange(min=0.1),
            metavar="SECONDS",
            help="Seconds a batch may take once its replica has made one (a stuck rank then ends the "
            "job, exit 1, naming it). Default: 10x the slowest pace seen so far for the batch's "
            "images x steps, at least 120 s; a replica's first batch may take up to an hour.",
        ),
        click.option(
            "--hook",
            "hooks",
            multiple=True,
            metavar="HOOK",
            help="Monitoring hook (repeatable): prometheus, trace:FILE, an entry point of "
            "spmd_diffusion.hooks, or a dotted path to a class.",
        ),
        click.option(
            "--lora",
            multiple=True,
            metavar="PATH_OR_ID[:SCALE]",
            help="LoRA adapter (repeatable): a save_lora_weights file or directory, or a hub id; "
            "scale 1 by default.",
        ),
        click.option(
            "--scheduler",
            default=None,
            metavar="CLASS",
            help="diffusers scheduler class (e.g. EulerDiscreteScheduler), built from the "
            "pipeline's scheduler config.",
        ),
        click.option(
            "--scheduler-option",
            "scheduler_option",
            multiple=True,
            metavar="KEY=VALUE",
            help="Scheduler option (repeatable); VALUE is read as JSON, else as a string.",
        ),
        click.option(
            "--offload",
            type=click.Choice(["model", "sequential", "group"]),
            default=None,
            help="diffusers CPU offload (needs a GPU): model (whole models, small slowdown), group "
            "(groups of blocks, copies overlapped on a CUDA stream) or sequential (layer by layer: "
            "least memory, slow).",
        ),
        click.option(
            "--quantize",
            default=None,
            metavar="KIND",
            help="Quantized weights through diffusers' quantization configs: int8wo, int8dq, int4wo, "
            "float8wo, float8dq (torchao), bnb-nf4, bnb-int8 (bitsandbytes); a kind this machine "
            "cannot run is refused before loading.",
        ),
        click.option(
            "--quantize-components",
            default="denoiser",
            show_default=True,
            metavar="NAMES",
            callback=lambda ctx, param, value: [
                name.strip() for name in value.split(",") if name.strip()
            ],
            help="Comma-separated pipeline components to quantize (denoiser: the transformer or unet; "
            "e.g. denoiser,text_encoder_2).",
        ),
        click.option(
            "--vae-tiling",
            is_flag=True,
            help="Decode the VAE in tiles (large images, less memory).",
        ),
        click.option(
            "--vae-slicing", is_flag=True, help="Decode the VAE one image at a time (less memory)."
        ),
        click.option(
            "--attention-backend",
            default=None,
            metavar="NAME",
            help="diffusers attention dispatcher backend: native, flash, sage, ... (where installed).",
        ),
        click.option(
            "--compile",
            is_flag=True,
            help="torch.compile the denoiser (compile time is reported apart from throughput).",
        ),
        click.option(
            "--cache",
            default=None,
            metavar="KIND[:VALUE]",
            help="Step cache through diffusers' hooks: first-block[:threshold], taylorseer[:interval], "
            "pab[:steps] or faster[:steps]; faster, slightly different pixels "
            "(benchmarks/RESULTS.md has the speed-up and PSNR per kind).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def setting_option(setting: Setting) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``generate`` flag of a request setting: its run-wide value (items may override it)."""
    kind: Any = click.STRING
    if setting.kind == "int" and (setting.minimum is not None or setting.maximum is not None):
        kind = click.IntRange(min=setting.minimum, max=setting.maximum)
    elif setting.kind == "int":
        kind = click.INT
    elif setting.kind == "float":
        kind = click.FloatRange(setting.minimum, setting.maximum, min_open=setting.open_minimum)
    return click.option(
        setting.flag,
        type=kind,
        default=None,
        help=setting.help,
        callback=finite_number if setting.kind == "float" else None,
    )


def request_setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every request setting that has a ``generate`` flag (``request_settings.FLAG_SETTINGS``)."""
    for setting in reversed(FLAG_SETTINGS):
        command = setting_option(setting)(command)
    return command


def parallel_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--tp, --ulysses, --ring and --cfg-parallel: the replica layout of the commands that
    generate (ranks per replica = tp x ulysses x ring x (2 with --cfg-parallel))."""
    command = click.option(
        "--ring",
        "ring_degree",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Sequence-parallel ranks per replica passing key/value chunks around a ring "
        "(ring attention); composes with --ulysses.",
    )(command)
    command = click.option(
        "--ulysses",
        "ulysses_degree",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Sequence-parallel ranks per replica splitting an image's tokens, attention heads "
        "exchanged by all-to-all (Ulysses); must divide the heads.",
    )(command)
    command = click.option(
        "--vae-parallel",
        is_flag=True,
        help="Split each image's VAE decode into bands of rows over the replica's ranks "
        "(halo rows exchanged: the whole decode's pixels, a fraction of its memory).",
    )(command)
    command = click.option(
        "--cfg-parallel", is_flag=True, help="Run the two guidance branches on two ranks."
    )(command)
    return click.option(
        "--tp",
        "tensor_parallel_size",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Tensor-parallel ranks per replica (must divide the ranks).",
    )(command)


def build_config(**values: Any) -> OmniDiffusionConfig:
    """An OmniDiffusionConfig, or a usage error (exit 2) naming the bad field."""
    from spmd_diffusion.engine.hooks import check_hook_spec
    from spmd_diffusion.engine.policies import resolve_policy
    from spmd_diffusion.executor.registry import check_executor_for_launch, resolve_executor_class
    from spmd_diffusion.models import check_model_reference
    from spmd_diffusion.models.options import check_model_options
    from spmd_diffusion.models.schedulers import parse_scheduler_option

    values["hooks"] = list(values.get("hooks") or ())
    values["lora"] = list(values.get("lora") or ())
    try:
        values["scheduler_options"] = dict(
            parse_scheduler_option(text) for text in values.pop("scheduler_option", ())
        )
        check_model_reference(values["model"])
        config = OmniDiffusionConfig(**values)
        check_model_options(config)
        resolve_policy(config.schedule)
        for hook in config.hooks:
            check_hook_spec(hook)
        check_executor_for_launch(resolve_executor_class(config.executor_class))
        return config
    except (ValueError, ImportError) as exc:
        raise click.UsageError(str(exc)) from None


def fatal_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line (and exit 1) for an expected failure; tracebacks only with -v.

    When a rank of a launched job is gone, the process leaves at once after that line:
    tearing down torch's process group over a dead peer aborts in C++ ("terminate called
    without an active exception", SIGABRT, seen under torchrun about one run in two)."""
    from spmd_diffusion.errors import SpmdDiffusionError, WorkerDiedError, WorkerError

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SpmdDiffusionError, OSError) as exc:
            logger.debug("fatal: %s", exc)  # with -v: every rank's traceback
            click.echo(f"error: {exc.brief() if isinstance(exc, WorkerError) else exc}", err=True)
            lost = isinstance(exc, WorkerDiedError) or (
                isinstance(exc, WorkerError) and exc.rank_lost
            )
            if lost and detect_launcher().is_distributed:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_FATAL)
            sys.exit(EXIT_FATAL)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="omni-diffuse")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """SPMD batch inference for diffusers pipelines (mpirun, srun, torchrun or none).

    Every rank runs the same command; rank 0 reads the input, drives the other ranks and
    writes the output.
    """
    from spmd_diffusion.utils.logs import setup_logging

    setup_logging(detect_launcher().rank, "DEBUG" if verbose else None)


def raise_terminated(_signum: int, _frame: Any) -> None:
    raise Terminated()


def main(args: list[str] | None = None) -> None:
    """Console entry point: usage errors are printed by rank 0 only, and exit 2 everywhere;
    Ctrl-C and SIGTERM end the job with one line (exit 130 / 143)."""
    rank = detect_launcher().rank
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = cli.main(args=args, prog_name="omni-diffuse", standalone_mode=False)
    except click.ClickException as exc:
        if rank == 0:
            exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        exc = (
            exc.__cause__ or exc if isinstance(exc, click.exceptions.Abort) else exc
        )  # click wraps it
        if rank == 0:
            click.echo(interrupt_message(args if args is not None else sys.argv[1:], exc), err=True)
        # The books are closed (run.json says "interrupted"); a worker thread may still be
        # inside torch, and tearing the interpreter down under it aborts the process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(interrupt_exit_code(exc))
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def interrupt_message(args: list[str], exc: BaseException) -> str:
    """The one line a signal ends a command with: only a batch job resumes."""
    why = "received SIGTERM" if isinstance(exc, Terminated) else "was stopped (Ctrl-C)"
    command = next((arg for arg in args if not arg.startswith("-")), "")
    if command == "generate":
        return f"interrupted: the job {why}; run the same command again to resume"
    if command in ("serve", "worker"):
        return f"stopped: the {'server' if command == 'serve' else 'worker'} {why}"
    return f"interrupted: omni-diffuse {command} {why}".replace("  ", " ")


def control_backend(executor_class: str | None) -> str | None:
    """The control plane an explicitly chosen SPMD executor needs (e.g. ``--executor torchrun``
    under srun, where the default would be MPI); None: the launcher's default."""
    from spmd_diffusion.executor.registry import resolve_executor_class

    try:
        return getattr(resolve_executor_class(executor_class), "control_backend", None) or None
    except ValueError:
        return None  # reported by rank 0 as a usage error


def spmd_command(
    prepare: Callable[[], OmniDiffusionConfig | None],
    job: Callable[[Any], int],
    executor_class: str | None = None,
) -> int:
    """Run ``job`` under whatever launcher started this process (or none)."""
    from spmd_diffusion.entrypoints.spmd import run_spmd

    backend = control_backend(executor_class) if executor_class else None
    return run_spmd(
        detect_launcher(), prepare, job, usage_errors=(click.UsageError,), backend=backend
    )


@cli.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--arch",
    type=click.Choice(list(TINY_BUILDERS)),
    default="unet",
    show_default=True,
    help="The family: unet (SD 1.x), sdxl, dit (PixArt-alpha), sd3 (SD3.5), flux (FLUX.1-dev), "
    "qwen-image, sana, video (Wan 2.1), ltx (LTX-Video).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights.")
def make_tiny_model_command(directory: str, arch: str, seed: int) -> None:
    """Build a tiny random-weight pipeline into DIRECTORY (loadable with from_pretrained)."""
    from spmd_diffusion.models.tiny import make_tiny_model

    path = make_tiny_model(directory, arch=arch, seed=seed)
    click.echo(f"wrote a tiny {arch} pipeline to {path}")


@cli.command()
@model_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; beyond loopback an API key is required.",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key",
    envvar="SPMD_DIFFUSION_API_KEY",
    default=None,
    help="Bearer token every /v1 request must carry (or $SPMD_DIFFUSION_API_KEY).",
)
@click.option(
    "--served-model-name", default=None, help="Model name in /v1/models (default: --model)."
)
@click.option(
    "--batch-wait-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, 10000),
    help="How long a partial batch waits for same-shape requests to join it.",
)
@click.option(
    "--max-queue",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests that may wait for a replica; beyond that new ones get 503.",
)
@click.option(
    "--lora-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Adapters requests may name: every weights file or adapter directory in DIR, by its stem "
    "(also --lora NAME=PATH, repeatable; a plain --lora PATH is always on).",
)
@click.option(
    "--max-loras",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Adapters kept loaded per replica; past it the least recently used is unloaded.",
)
@click.option(
    "--max-video-jobs",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Video jobs queued, running or waiting to be fetched; beyond that new ones get 429.",
)
@click.option(
    "--video-ttl",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds a finished video job (and its file) is kept.",
)
@parallel_options
@fatal_errors
def serve(
    host: str,
    port: int,
    api_key: str | None,
    served_model_name: str | None,
    batch_wait_ms: float,
    max_queue: int,
    lora_dir: str | None,
    max_loras: int,
    max_video_jobs: int,
    video_ttl: float,
    tensor_parallel_size: int,
    cfg_parallel: bool,
    **model_values: Any,
) -> int:
    """Serve the OpenAI images API (POST /v1/images/generations and /v1/images/edits, GET
    /v1/models), video jobs (/v1/videos), the native POST /v1/diffusion/generate (with
    "stream": true for step events), GET /health and GET /metrics. Under mpirun/srun/torchrun
    the server runs on rank 0 and every rank serves the engine; concurrent requests are
    batched and spread over every replica; a request may name adapters from --lora-dir and
    --lora NAME=PATH."""
    from spmd_diffusion.entrypoints.http.loras import lora_catalog, split_lora_options
    from spmd_diffusion.entrypoints.server import (
        ServerLimits,
        check_listen_address,
    )
    from spmd_diffusion.entrypoints.server import (
        serve as make_server,
    )

    bound: dict[str, Any] = {}

    def prepare() -> OmniDiffusionConfig:
        try:
            run_loras, named = split_lora_options(model_values["lora"])
            bound["loras"] = lora_catalog(named, lora_dir)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        values = {**model_values, "lora": run_loras}
        config = build_config(
            **values,
            tensor_parallel_size=tensor_parallel_size,
            cfg_parallel=cfg_parallel,
            batch_wait_s=batch_wait_ms / 1000,
            max_loras=max(max_loras, len(run_loras)) if bound["loras"] else None,
        )
        check_world_layout(config)
        try:
            check_listen_address(host, api_key)
            bound["socket"] = bind_socket(host, port)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        return config

    def job(engine: Any) -> int:
        limits = ServerLimits(
            max_queued_requests=max_queue, max_video_jobs=max_video_jobs, video_job_ttl_s=video_ttl
        )
        server = make_server(
            engine,
            api_key=api_key,
            model_name=served_model_name or model_values["model"],
            limits=limits,
            sock=bound["socket"],
            loras=bound["loras"],
        )
        click.echo(f"serving on {server.url}", err=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return EXIT_OK

    return spmd_command(prepare, job, model_values["executor_class"])


def serve_metrics(engine: Any, port: int) -> None:
    """The job's Prometheus metrics on loopback (read-only counters; nothing else listens)."""
    from spmd_diffusion.engine.prometheus_hooks import PrometheusHooks

    metrics = next(hook for hook in engine.hooks.hooks if isinstance(hook, PrometheusHooks))
    metrics.serve(port)
    click.echo(f"metrics on http://127.0.0.1:{port}/metrics", err=True)


def bind_socket(host: str, port: int) -> Any:
    """The listening socket, bound before any model loads (a busy port is a usage error)."""
    from spmd_diffusion.entrypoints.server import listen_socket

    try:
        return listen_socket(host, port)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@cli.command()
@model_options
@click.option(
    "--listen", required=True, metavar="HOST:PORT", help="Address to wait for the executor on."
)
@click.option("--rank", default=0, show_default=True, type=int, help="This worker's rank.")
@click.option("--world-size", default=1, show_default=True, type=int, help="Number of workers.")
@fatal_errors
def worker(listen: str, rank: int, world_size: int, **model_values: Any) -> None:
    """Run one worker for the external executor (needs $SPMD_DIFFUSION_AUTHKEY)."""
    from spmd_diffusion.entrypoints.external_worker import serve_external_worker
    from spmd_diffusion.executor.external_executor import authkey_from, parse_address

    config = build_config(**model_values)
    try:
        parse_address(listen)
        authkey = authkey_from({})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_external_worker(config, listen, authkey, rank=rank, world_size=world_size)


@cli.command()
@model_options
@fatal_errors
def info(**model_values: Any) -> int:
    """Load the model on every rank and print the layout and each rank's health (JSON)."""
    import json

    from spmd_diffusion.entrypoints.spmd import describe_layout

    def job(engine: Any) -> int:
        click.echo(json.dumps(describe_layout(engine), indent=2))
        return EXIT_OK

    return spmd_command(lambda: build_config(**model_values), job, model_values["executor_class"])


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE`` (JSON or TOML): option defaults, overridden by the command line. Keys
    are the command's flag names (``batch-size`` or ``batch_size``, ``tp``, ``max-steps``,
    ``prompts``); each value must have its flag's type (no silent coercion: ``true`` is no
    number, ``1.7`` no integer) and passes the flag's own checks (ranges, choices)."""
    if not value:
        return value
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a table/object of option values")
    flags = config_keys(ctx.command)
    defaults = {}
    for key, item in data.items():
        param = flags.get(key) or flags.get(key.replace("_", "-"))
        if param is None:
            raise click.BadParameter(
                f"{value}: unknown option {key!r} (keys are the flag names, e.g. batch-size)"
            )
        defaults[param.name] = config_value(ctx, param, item, f"{value}: {key}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_keys(command: click.Command) -> dict[str, click.Option]:
    """Config-file key (a flag's name without its dashes) -> the option it sets."""
    keys = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "config_file":
            for flag in param.opts:
                if flag.startswith("--"):
                    keys[flag[2:]] = param
    return keys


def config_value(ctx: click.Context, param: click.Option, item: Any, where: str) -> Any:
    """A config value checked against its option: the JSON/TOML type first (bool is no
    number, a float no integer), then the option's own conversion and checks."""
    if param.multiple:
        items = [item] if isinstance(item, str) else item
        if not isinstance(items, list) or not all(isinstance(entry, str) for entry in items):
            raise click.BadParameter(
                f"{where} must be a string or a list of strings, got {json.dumps(item)}"
            )
        return [config_value(ctx, _single(param), entry, where) for entry in items]
    kind = param.type
    if param.is_flag:
        expected, ok = "true or false", isinstance(item, bool)
    elif isinstance(kind, (click.types.IntParamType, click.IntRange)):
        expected, ok = "an integer", isinstance(item, int) and not isinstance(item, bool)
    elif isinstance(kind, (click.types.FloatParamType, click.FloatRange)):
        expected, ok = "a number", isinstance(item, (int, float)) and not isinstance(item, bool)
    else:
        expected, ok = "a string", isinstance(item, str)
    if not ok:
        raise click.BadParameter(
            f"{where} must be {expected}, got {json.dumps(item, default=repr)}"
        )
    try:
        converted = kind.convert(item, param, ctx)
        if param.callback is not None and param.callback is not load_config_file:
            converted = param.callback(ctx, param, converted)
        return converted
    except click.BadParameter as exc:
        raise click.BadParameter(f"{where}: {exc.message}") from None


def _single(param: click.Option) -> click.Option:
    """A copy of a repeatable option that takes one value (to check each list entry)."""
    single = copy.copy(param)
    single.multiple = False
    return single


def finite_number(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """NaN and infinity parse as floats but are no setting (and are not JSON)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=param)
    return value


def job_layout(engine: Any) -> dict[str, Any]:
    """The layout the executor runs (read from it, never recomputed)."""
    layout = engine.executor.parallel_layout
    return {
        "launcher": detect_launcher().kind,
        "executor": type(engine.executor).__name__,
        "world_size": layout.world_size,
        "replica_size": layout.replica_size,
        "replicas": layout.dp,
        "tensor_parallel_size": layout.tp,
        "cfg_parallel": layout.cfg == 2,
        "ulysses_degree": layout.ulysses,
        "ring_degree": layout.ring,
    }


def check_world_layout(config: OmniDiffusionConfig) -> None:
    """tp x cfg must divide the ranks (or workers) the chosen executor will run."""
    from spmd_diffusion.executor.registry import resolve_executor_class

    world = resolve_executor_class(config.executor_class).planned_world_size(config)
    if world is not None and world % config.replica_size:
        flags = [
            f"--{flag} {value}"
            for flag, value in (
                ("tp", config.tensor_parallel_size),
                ("ulysses", config.ulysses_degree),
                ("ring", config.ring_degree),
            )
            if value > 1
        ]
        raise click.UsageError(
            f"{' x '.join(flags + ['--cfg-parallel'] * config.cfg_parallel)} "
            f"needs a multiple of {config.replica_size} ranks; this job has {world}"
        )
    if config.replica_size > 1 and config.device != "cpu":
        check_gpus_for_parallel(config, world)


def check_gpus_for_parallel(config: OmniDiffusionConfig, world: int | None) -> None:
    """Tensor/CFG parallel on GPUs: one GPU per rank on this node, checked before loading."""
    import torch

    from spmd_diffusion.worker.device import check_one_gpu_per_rank

    if not torch.cuda.is_available():
        return  # auto means the CPU here; an explicit cuda fails at load with its own message
    launch = detect_launcher()
    on_node = (launch.local_world_size or launch.world_size) if launch.is_distributed else world
    try:
        check_one_gpu_per_rank(on_node or 1, torch.cuda.device_count())
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    callback=load_config_file,
    is_eager=True,
    expose_value=True,
    help="JSON or TOML file of option defaults.",
)
@click.option(
    "--prompts",
    "prompts_file",
    help="The items: .txt (a prompt a line), .jsonl (prompt, optional id/seed/steps/image/mask_image/"
    "strength/...; or an OpenAI batch file), .csv, .parquet, a datasets directory (save_to_disk) "
    "or hf:NAME (a hub dataset).",
)
@click.option(
    "--prompt-column",
    default="prompt",
    show_default=True,
    help="parquet/datasets: the column holding the prompt.",
)
@click.option(
    "--id-column",
    default=None,
    help="parquet/datasets: the column holding the item id (default: 'id' if there is one, else the row).",
)
@click.option(
    "--split", default=None, help="datasets: the split to read (default: train, or the only one)."
)
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeat for several).")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory: images/, manifest.jsonl, run.json, contact_sheet.png.",
)
@request_setting_options
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--image-format",
    type=click.Choice(["png", "jpg", "webp"]),
    default="png",
    show_default=True,
    help="Image files; each carries its prompt, seed and settings (PNG text, EXIF/XMP).",
)
@click.option(
    "--quality",
    type=click.IntRange(1, 100),
    default=None,
    help="jpg/webp/mp4 quality (default 90); 100 makes webp videos lossless.",
)
@click.option(
    "--video-format",
    type=click.Choice(["mp4", "webp", "gif"]),
    default=None,
    help="Video files: mp4 (H.264; needs the video extra, imageio-ffmpeg), webp or gif (animated, "
    "Pillow). Default: mp4 where imageio-ffmpeg is installed, else webp.",
)
@click.option(
    "--output-format",
    type=click.Choice(["files", "webdataset"]),
    default="files",
    show_default=True,
    help="files: OUTPUT/images/<id>.<ext>; webdataset: tar shards OUTPUT/shards/*.tar written by each "
    "replica, listed in OUTPUT/shards.txt.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Images per WebDataset shard.",
)
@parallel_options
@click.option(
    "--batch-invariant",
    is_flag=True,
    help="Run every forward pass one sample at a time: images then do not depend on --batch-size.",
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Skip images a previous run in --output finished (manifest + file).",
)
@click.option(
    "--fail-fast", is_flag=True, help="Stop handing out work after the first failed item."
)
@click.option(
    "--trace",
    "trace_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a JSON-lines trace of the engine's events (queued, batch started/finished, done).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus metrics on 127.0.0.1:PORT while the job runs.",
)
@model_options
@fatal_errors
def generate(
    config_file: str | None,
    prompts_file: str | None,
    prompt_column: str,
    id_column: str | None,
    split: str | None,
    prompts: tuple[str, ...],
    output: str,
    steps: int | None,
    guidance: float | None,
    true_cfg_scale: float | None,
    height: int | None,
    width: int | None,
    negative_prompt: str | None,
    strength: float | None,
    images_per_prompt: int,
    image_format: str,
    quality: int | None,
    num_frames: int | None,
    fps: float | None,
    video_format: str | None,
    output_format: str,
    shard_size: int,
    tensor_parallel_size: int,
    cfg_parallel: bool,
    batch_invariant: bool,
    resume: bool,
    fail_fast: bool,
    trace_file: str | None,
    metrics_port: int | None,
    **model_values: Any,
) -> int:
    """Generate images for many prompts: the batch job, under mpirun, srun, torchrun or none.

    Writes OUTPUT/images/<id>[_k].png (or WebDataset shards OUTPUT/shards/*.tar),
    OUTPUT/manifest.jsonl (a line per image), OUTPUT/run.json and OUTPUT/contact_sheet.png.

    \b
    Exit codes: 0 all images made; 3 some items failed (their manifest lines say why);
    2 bad input (nothing loaded); 1 a fatal fault (a lost or stuck rank is named);
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM). Launchers' own codes: torchrun
    turns any failure into 1; under mpiexec a rank killed by a signal gives that signal's
    number (9: SIGKILL, out-of-memory kills included) and mpiexec killed gives 137.
    The same command resumes in every case.
    """
    from spmd_diffusion.errors import InputError
    from spmd_diffusion.jobs.generate import GenerateJob, GenerateOptions, plan_generation

    batch_size = model_values.pop("max_batch_size")
    options = GenerateOptions(
        output=output,
        prompts_file=prompts_file,
        prompts=prompts,
        steps=steps,
        guidance=guidance,
        true_cfg_scale=true_cfg_scale,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        strength=strength,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
        resume=resume,
        fail_fast=fail_fast,
        image_format=image_format,
        quality=quality,
        output_format=output_format,
        shard_size=shard_size,
        prompt_column=prompt_column,
        id_column=id_column,
        split=split,
        num_frames=num_frames,
        fps=fps,
        video_format=video_format,
    )
    plan_holder: dict[str, Any] = {}
    model_values["hooks"] = [
        *model_values.get("hooks", ()),
        *(["trace:" + trace_file] if trace_file else []),
        *(["prometheus"] if metrics_port else []),
    ]

    def prepare() -> OmniDiffusionConfig | None:
        if metrics_port:
            try:
                bind_socket("127.0.0.1", metrics_port).close()
            except ValueError as exc:
                raise click.UsageError(f"--metrics-port: {exc}") from None
        config = build_config(
            **model_values,
            max_batch_size=options.images_per_batch,
            tensor_parallel_size=tensor_parallel_size,
            cfg_parallel=cfg_parallel,
            batch_invariant=batch_invariant,
        )
        check_world_layout(config)
        try:
            plan = plan_holder["plan"] = plan_generation(options, config)
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        if not plan.batches_to_run:
            click.echo(
                f"nothing to do: all {plan.images_total} image(s) in {output} are done "
                "(--no-resume makes them again)",
                err=True,
            )
            return None
        return config

    def job(engine: Any) -> int:
        if metrics_port:
            serve_metrics(engine, metrics_port)
        return GenerateJob(plan_holder["plan"], job_layout(engine)).run(engine)

    return spmd_command(prepare, job, model_values["executor_class"])


if __name__ == "__main__":
    main()
