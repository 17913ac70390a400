"""Where a model comes from and how it is loaded.

``model`` is one of the embedded tiny models (``tiny-unet``, ``tiny-dit``, built on first use
into a cache), a local directory written by ``save_pretrained``, or a hub id. Loading always
goes through diffusers' real ``from_pretrained``.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers, transformers)

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import re
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.models.tiny import TINY_MODEL_VERSION, build_in_subprocess, make_tiny_model
from spmd_diffusion.models.tiny.families import PIPELINES

TINY_MODELS = {f"tiny-{arch}": arch for arch in PIPELINES}  # tiny-unet, tiny-flux, ...
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """``$SPMD_DIFFUSION_CACHE``, else ``$XDG_CACHE_HOME/spmd_diffusion`` (``~/.cache``)."""
    return Path(envs.cache_dir())


def _is_complete(directory: Path) -> bool:
    marker = directory / "tiny_model.json"
    if not (directory / "model_index.json").exists() or not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == TINY_MODEL_VERSION
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_model(name: str) -> Path:
    """The cached tiny model ``name``, built once (under a file lock) if missing."""
    arch = TINY_MODELS[name]
    directory = cache_root() / f"{name}-v{TINY_MODEL_VERSION}"
    if _is_complete(directory):
        return directory
    with _file_lock(cache_root() / f".{name}.lock"):
        if not _is_complete(directory):
            if _in_process_group():
                build_in_subprocess(directory, arch)
            else:
                make_tiny_model(directory, arch=arch)
    return directory


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def check_model_reference(model: str) -> None:
    """Cheap validation for rank 0, before any process loads anything.

    Raises ValueError for a path that does not exist or holds no diffusers pipeline, and
    for a string that is neither a tiny model name, a path, nor a hub id.
    """
    if model in TINY_MODELS:
        return
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise ValueError(f"model path {model!r} does not exist or is not a directory")
        if not (path / "model_index.json").exists():
            raise ValueError(
                f"model directory {model!r} holds no model_index.json (not a diffusers pipeline)"
            )
        check_model_files(path)
        return
    if not HUB_ID.match(model):
        names = ", ".join(TINY_MODELS)
        raise ValueError(
            f"unknown model {model!r}: give a local pipeline directory, a hub id (org/name) "
            f"or one of {names}"
        )


def check_model_files(directory: Path) -> None:
    """A local pipeline's index parses and every safetensors file is whole (its header read:
    the 8-byte length, the JSON, and the data it promises within the file's size), so a
    corrupt or half-copied checkpoint is refused before every rank loads it."""
    try:
        index = json.loads((directory / "model_index.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(
            f"{directory / 'model_index.json'} is not a readable JSON file ({exc})"
        ) from None
    if not isinstance(index, dict):
        raise ValueError(f"{directory / 'model_index.json'} is not a JSON object")
    for weights in sorted(directory.glob("*/*.safetensors")):
        problem = _safetensors_problem(weights)
        if problem is not None:
            raise ValueError(f"model file {weights} is damaged: {problem}")


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                return f"{size} bytes cannot hold the {length}-byte header it announces"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"its header does not parse ({exc})"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + length + max(ends, default=0)
    return f"truncated: {size} bytes, {needed} needed" if needed > size else None


def resolve_model_path(model: str) -> str:
    """A local directory or hub id that ``from_pretrained`` accepts."""
    check_model_reference(model)
    if model in TINY_MODELS:
        return str(ensure_tiny_model(model))
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def check_pipeline_class(class_name: str | None) -> None:
    """``--model-class-name`` names a diffusers pipeline class (checked before loading)."""
    if class_name is not None:
        pipeline_class(class_name)


def pipeline_class(class_name: str | None) -> Any:
    """``DiffusionPipeline`` (class read from model_index.json) or a named diffusers class."""
    import diffusers

    if class_name is None:
        return diffusers.DiffusionPipeline
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"model_class_name {class_name!r} is not a diffusers pipeline class")
    return cls


TINY_PIPELINES = {name: PIPELINES[arch] for name, arch in TINY_MODELS.items()}


def model_call_defaults(model: str) -> dict[str, Any]:
    """Call defaults a model directory carries for the tool (``call_defaults`` in a tiny
    model's ``tiny_model.json``): the tiny video model's own defaults are 81 frames of
    480x832, sized for the real Wan and hours of CPU for the tiny one."""
    try:
        marker = Path(resolve_model_path(model)) / "tiny_model.json"
        defaults = json.loads(marker.read_text()).get("call_defaults", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return defaults if isinstance(defaults, dict) else {}


def declared_pipeline_class(model: str, class_name: str | None) -> str | None:
    """The pipeline class a load will use, known without loading: ``class_name``, a tiny
    model's, or a local directory's ``model_index.json``; None for a hub id."""
    if class_name:
        return class_name
    if model in TINY_PIPELINES:
        return TINY_PIPELINES[model]
    try:
        name = json.loads((Path(model).expanduser() / "model_index.json").read_text()).get(
            "_class_name"
        )
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def component_config(model: str, *components: str) -> tuple[str, dict[str, Any]] | None:
    """(class name, config) of the first of ``components`` the pipeline has, read from its
    config.json without loading any weight; None for a hub id. A tiny model is built first if
    it is missing (every rank would need it a moment later anyway)."""
    if not (model in TINY_MODELS or Path(model).expanduser().is_dir()):
        return None
    directory = Path(resolve_model_path(model))
    for component in components:
        try:
            config = json.loads((directory / component / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and isinstance(config.get("_class_name"), str):
            return config["_class_name"], config
    return None


def component_names(model: str) -> list[str] | None:
    """The pipeline's components (model_index.json's keys that name a library and class);
    None for a hub id."""
    if not (model in TINY_MODELS or Path(model).expanduser().is_dir()):
        return None
    try:
        index = json.loads((Path(resolve_model_path(model)) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and value[0] is not None
    ]


def denoiser_config(model: str) -> tuple[str, dict[str, Any]] | None:
    """(class name, config) of the pipeline's denoiser (``transformer``, else ``unet``)."""
    return component_config(model, "transformer", "unet")


def call_arguments(model: str, class_name: str | None) -> tuple[str, set[str]] | None:
    """The pipeline class's name and the named arguments of its ``__call__`` (None when the
    class cannot be known before loading): rank 0 refuses items it could not run.

    Read from a small cache keyed by the installed diffusers' version where it was seen
    before: importing diffusers and a pipeline class was half of a tiny job's start-up on rank 0
    (benchmarks/RESULTS.md, "Engine overhead"), and without a launcher the engine process needs
    nothing else of them."""
    name = declared_pipeline_class(model, class_name)
    if not name:
        return None
    known = _signature_cache()
    key = f"{_diffusers_version()}:{name}"
    if key in known:
        return (name, set(known[key])) if known[key] is not None else None
    arguments = _call_arguments_of(name)
    _remember_signature(key, None if arguments is None else sorted(arguments))
    return None if arguments is None else (name, arguments)


def _call_arguments_of(name: str) -> set[str] | None:

    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not callable(cls):
        return None
    parameters = inspect.signature(cls.__call__).parameters.values()
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD}


SIGNATURES_FILE = "pipeline_call_arguments.json"


def _diffusers_version() -> str:

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "none"


def _signature_cache() -> dict[str, Any]:
    try:
        known = json.loads((Path(envs.cache_dir()) / SIGNATURES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remember_signature(key: str, arguments: list[str] | None) -> None:
    """Add one entry (written whole and renamed into place: concurrent jobs never see a part)."""

    directory = Path(envs.cache_dir())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        known = {**_signature_cache(), key: arguments}
        handle, temporary = tempfile.mkstemp(prefix=f".{SIGNATURES_FILE}.", dir=directory)
        with os.fdopen(handle, "w") as stream:
            json.dump(known, stream)
        os.replace(temporary, directory / SIGNATURES_FILE)
    except OSError:
        pass  # a cache that cannot be written is only slower


def call_defaults(model: str, pipeline: str | None) -> dict[str, Any]:
    """The defaults a call of ``pipeline`` (a diffusers class name) runs with where a request
    sets nothing: the model's own call defaults, else the ``__call__`` signature's."""

    import diffusers

    cls = getattr(diffusers, pipeline or "", None)
    defaults: dict[str, Any] = {}
    if cls is not None and callable(cls):
        defaults = {
            p.name: p.default
            for p in inspect.signature(cls.__call__).parameters.values()
            if p.default is not inspect.Parameter.empty
        }
    return {**defaults, **model_call_defaults(model)}


def makes_video(model: str, class_name: str | None) -> bool:
    """Does the pipeline make videos (its ``__call__`` takes ``num_frames``)? False when its
    class cannot be known before loading (a hub id)."""
    arguments = call_arguments(model, class_name)
    return arguments is not None and "num_frames" in arguments[1]


def _dtype_argument() -> str:
    """Newer diffusers renamed ``torch_dtype`` to ``dtype`` and warn on the old name."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return (
        "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    )


def load_pipeline(
    model: str,
    class_name: str | None,
    torch_dtype: Any,
    revision: str | None = None,
    variant: str | None = None,
    quantization_config: Any = None,
) -> Any:
    """Load with the real ``from_pretrained``; weights stay on the CPU until placed
    (``quantization_config``: diffusers' PipelineQuantizationConfig, applied as weights load)."""
    from diffusers.utils import logging as diffusers_logging

    cls = pipeline_class(class_name)
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # one bar per rank is noise; load time is logged
    transformers_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {_dtype_argument(): torch_dtype}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    pipeline = cls.from_pretrained(resolve_model_path(model), **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
