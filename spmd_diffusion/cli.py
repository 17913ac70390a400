"""``omni-diffuse``: the command line (``python -m spmd_diffusion`` is the same).

Exit codes: 0 success; 2 bad input or usage, before any model is loaded; 1 a fatal fault.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from spmd_diffusion import __version__
from spmd_diffusion.data import DEFAULT_MODEL, DTYPES, OmniDiffusionConfig
from spmd_diffusion.launcher import detect_launcher

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2

logger = logging.getLogger("spmd_diffusion.cli")


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options every model-loading command shares; they become an OmniDiffusionConfig."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Pipeline directory, hub id, or an embedded tiny model: tiny-unet, tiny-dit."),
        click.option("--model-class-name", default=None,
                     help="diffusers pipeline class to load with (default: from model_index.json)."),
        click.option("--executor", "executor_class", default=None,
                     help="Executor: mp, uni, a registered name, or a dotted path (default: by launcher)."),
        click.option("--num-gpus", default=1, show_default=True, type=int,
                     help="Worker processes for the mp executor (without a launcher)."),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(list(DTYPES)),
                     help="Weights dtype; auto is float16 on GPUs, float32 on CPUs."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Run seed: items without their own seed derive theirs from it and their id."),
        click.option("--batch-size", "max_batch_size", default=4, show_default=True, type=int,
                     help="Most images in one pipeline call."),
        click.option("--threads", "torch_num_threads", default=None, type=int,
                     help="torch intra-op threads per rank (CPU default: 1, for layout-independent results)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_config(**values: Any) -> OmniDiffusionConfig:
    """An OmniDiffusionConfig, or a usage error (exit 2) naming the bad field."""
    from spmd_diffusion.executor.registry import check_executor_for_launch, resolve_executor_class
    from spmd_diffusion.models import check_model_reference

    try:
        check_model_reference(values["model"])
        config = OmniDiffusionConfig(**values)
        check_executor_for_launch(resolve_executor_class(config.executor_class))
        return config
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def fatal_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line (and exit 1) for an expected failure; tracebacks only with -v."""
    from spmd_diffusion.errors import SpmdDiffusionError

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (SpmdDiffusionError, OSError) as exc:
            logger.debug("fatal", exc_info=True)
            click.echo(f"error: {exc}", err=True)
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
    from spmd_diffusion.logs import setup_logging

    setup_logging(detect_launcher().rank, "DEBUG" if verbose else None)


def main(args: list[str] | None = None) -> None:
    """Console entry point: usage errors are printed by rank 0 only, and exit 2 everywhere."""
    rank = detect_launcher().rank
    try:
        code = cli.main(args=args, prog_name="omni-diffuse", standalone_mode=False)
    except click.ClickException as exc:
        if rank == 0:
            exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        if rank == 0:
            click.echo("Aborted!", err=True)
        sys.exit(EXIT_FATAL)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def spmd_command(prepare: Callable[[], OmniDiffusionConfig], job: Callable[[Any], int]) -> int:
    """Run ``job`` under whatever launcher started this process (or none)."""
    from spmd_diffusion.spmd import run_spmd

    return run_spmd(detect_launcher(), prepare, job, usage_errors=(click.UsageError,))


@cli.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(["unet", "dit"]), default="unet", show_default=True,
              help="unet: Stable Diffusion 1.x layout; dit: PixArt-alpha layout.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights.")
def make_tiny_model_command(directory: str, arch: str, seed: int) -> None:
    """Build a tiny random-weight pipeline into DIRECTORY (loadable with from_pretrained)."""
    from spmd_diffusion.tiny_models import make_tiny_model

    path = make_tiny_model(directory, arch=arch, seed=seed)
    click.echo(f"wrote a tiny {arch} pipeline to {path}")


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@fatal_errors
def serve(host: str, port: int, **model_values: Any) -> None:
    """Serve POST /v1/diffusion/generate, GET /health and GET /metrics over HTTP."""
    from spmd_diffusion.engine import DiffusionEngine
    from spmd_diffusion.server import serve as make_server

    config = build_config(**model_values)
    with DiffusionEngine(config) as engine:
        server = make_server(engine, host, port)
        click.echo(f"serving on {server.url}", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


@cli.command()
@model_options
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address to wait for the executor on.")
@click.option("--rank", default=0, show_default=True, type=int, help="This worker's rank.")
@click.option("--world-size", default=1, show_default=True, type=int, help="Number of workers.")
@fatal_errors
def worker(listen: str, rank: int, world_size: int, **model_values: Any) -> None:
    """Run one worker for the external executor (needs $SPMD_DIFFUSION_AUTHKEY)."""
    from spmd_diffusion.executor.external_executor import authkey_from, parse_address
    from spmd_diffusion.external_worker import serve_external_worker

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

    from spmd_diffusion.spmd import describe_layout

    def job(engine: Any) -> int:
        click.echo(json.dumps(describe_layout(engine), indent=2))
        return EXIT_OK

    return spmd_command(lambda: build_config(**model_values), job)


if __name__ == "__main__":
    main()
