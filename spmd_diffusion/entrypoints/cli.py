"""``omni-diffuse``: the command line (``python -m spmd_diffusion`` is the same).

Exit codes: 0 success; 1 a fatal fault; 2 bad input or usage, reported before any model is
loaded; 3 (``generate``) the job finished but some items failed (see the manifest); 130
interrupted (Ctrl-C); 143 terminated (SIGTERM, e.g. Slurm's time limit or scancel). The
launcher may put its own in their place (README, "Errors"): torchrun 1; mpiexec the number
of the signal that killed a rank (9), or 137 when mpiexec itself is killed.
"""

# ruff: noqa: PLC0415 - each command imports the engine, server and models only when it runs (a
# usage error or --help answers without loading torch)

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from spmd_diffusion import __version__
from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.distributed.launcher import detect_launcher
from spmd_diffusion.entrypoints.cli_options import OptionValues, with_options
from spmd_diffusion.errors import Terminated, interrupt_exit_code
from spmd_diffusion.exit_codes import EXIT_FATAL, EXIT_OK
from spmd_diffusion.models.tiny.families import BUILDERS as TINY_BUILDERS
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger("spmd_diffusion.entrypoints.cli")


def build_config(values: dict[str, Any]) -> OmniDiffusionConfig:
    """An OmniDiffusionConfig from its options' values (``OptionValues.of("config")``), or a
    usage error (exit 2) naming the bad field."""
    from spmd_diffusion.engine.hooks import check_hook_spec
    from spmd_diffusion.engine.policies import resolve_policy
    from spmd_diffusion.executor.registry import check_executor_for_launch, resolve_executor_class
    from spmd_diffusion.models import check_model_reference
    from spmd_diffusion.models.options import check_model_options
    from spmd_diffusion.models.schedulers import parse_scheduler_option

    try:
        scheduler_options = dict(
            parse_scheduler_option(text) for text in values.get("scheduler_options", ())
        )
        check_model_reference(values["model"])
        config = OmniDiffusionConfig(**{**values, "scheduler_options": scheduler_options})
        check_model_options(config)
        resolve_policy(config.batch_policy)
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
@with_options("serve")
@fatal_errors
def serve(values: OptionValues) -> int:
    """Serve the OpenAI images API (POST /v1/images/generations and /v1/images/edits, GET
    /v1/models), video jobs (/v1/videos), the native POST /v1/diffusion/generate (with
    "stream": true for step events), GET /health and GET /metrics. Under mpirun/srun/torchrun
    the server runs on rank 0 and every rank serves the engine; concurrent requests are
    batched and spread over every replica; a request may name adapters from --lora-dir and
    --lora NAME=PATH."""
    from spmd_diffusion.entrypoints.http.loras import lora_catalog, split_lora_options
    from spmd_diffusion.entrypoints.server import ServerLimits, check_listen_address
    from spmd_diffusion.entrypoints.server import serve as make_server

    bound: dict[str, Any] = {}

    def prepare() -> OmniDiffusionConfig:
        try:
            run_loras, named = split_lora_options(values.lora)
            bound["loras"] = lora_catalog(named, values.lora_dir)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        config = build_config(
            {
                **values.of("config"),
                "lora": run_loras,
                "batch_wait_s": values.batch_wait_ms / 1000,
                "max_loras": max(values.max_loras, len(run_loras)) if bound["loras"] else None,
            }
        )
        check_world_layout(config)
        try:
            check_listen_address(values.host, values.api_key)
            bound["socket"] = bind_socket(values.host, values.port)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        return config

    def job(engine: Any) -> int:
        seconds = engine.warm_up([OmniDiffusionRequest("warm-up", request_id="server")])
        if seconds is not None:
            click.echo(f"warmed up in {seconds:.1f} s", err=True)
        limits = ServerLimits(
            max_queued_requests=values.max_queue,
            max_video_jobs=values.max_video_jobs,
            video_job_ttl_s=values.video_ttl,
        )
        server = make_server(
            engine,
            api_key=values.api_key,
            model_name=values.served_model_name or values.model,
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

    return spmd_command(prepare, job, values.executor_class)


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
@with_options("worker")
@fatal_errors
def worker(values: OptionValues) -> None:
    """Run one worker for the external executor (needs $SPMD_DIFFUSION_AUTHKEY)."""
    from spmd_diffusion.entrypoints.external_worker import serve_external_worker
    from spmd_diffusion.executor.external_executor import authkey_from, parse_address

    config = build_config(values.of("config"))
    try:
        parse_address(values.listen)
        authkey = authkey_from({})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_external_worker(
        config, values.listen, authkey, rank=values.rank, world_size=values.world_size
    )


@cli.command()
@with_options("info")
@fatal_errors
def info(values: OptionValues) -> int:
    """Load the model on every rank and print the layout and each rank's health (JSON)."""
    from spmd_diffusion.entrypoints.spmd import describe_layout

    def job(engine: Any) -> int:
        click.echo(json.dumps(describe_layout(engine), indent=2))
        return EXIT_OK

    return spmd_command(lambda: build_config(values.of("config")), job, values.executor_class)


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
@with_options("generate")
@fatal_errors
def generate(values: OptionValues) -> int:
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

    options = GenerateOptions(**values.of("run"))
    trace_file, metrics_port = values.trace_file, values.metrics_port
    plan_holder: dict[str, Any] = {}

    def prepare() -> OmniDiffusionConfig | None:
        if metrics_port:
            try:
                bind_socket("127.0.0.1", metrics_port).close()
            except ValueError as exc:
                raise click.UsageError(f"--metrics-port: {exc}") from None
        config = build_config(
            {
                **values.of("config"),
                "max_images_per_batch": options.images_per_batch,
                "hooks": [
                    *values.hooks,
                    *(["trace:" + trace_file] if trace_file else []),
                    *(["prometheus"] if metrics_port else []),
                ],
            }
        )
        check_world_layout(config)
        try:
            plan = plan_holder["plan"] = plan_generation(options, config)
        except InputError as exc:
            raise click.UsageError(str(exc)) from None
        if not plan.batches_to_run:
            click.echo(
                f"nothing to do: all {plan.images_total} image(s) in {options.output} are done "
                "(--no-resume makes them again)",
                err=True,
            )
            return None
        return config

    def job(engine: Any) -> int:
        if metrics_port:
            serve_metrics(engine, metrics_port)
        return GenerateJob(plan_holder["plan"], job_layout(engine)).run(engine)

    return spmd_command(prepare, job, values.executor_class)


if __name__ == "__main__":
    main()
