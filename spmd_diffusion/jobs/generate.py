"""``omni-diffuse generate``: prompts in, images and a manifest out, resumably.

Rank 0 plans the job by reading the input once, a record at a time (checks every item, fixes
its seed, counts the fixed batches and what a previous run finished) before any model
loads; then reads it again while the job runs, cutting fixed batches as it goes and handing
them to replicas as they free up. Neither pass holds the item list: rank 0 keeps the
batches in flight and a few counters, so a million-prompt job costs it no more memory than
a small one. Each replica's leader writes its own images (files, or WebDataset shards);
rank 0 receives one small record per image and keeps the books: the manifest, the progress
bar, and at the end ``run.json``, a contact sheet, a summary, and the check that every
planned image has a record -- a batch that went missing makes the run incomplete (exit 3),
never a success.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import platform
import sys
import tarfile
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spmd_diffusion import __version__
from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.engine.batching import ChunkCounter, iter_chunks
from spmd_diffusion.engine.seeding import derive_seed
from spmd_diffusion.errors import InputError, OutputWriteError
from spmd_diffusion.exit_codes import EXIT_OK, EXIT_PARTIAL
from spmd_diffusion.jobs.contact_sheet import write_contact_sheet
from spmd_diffusion.jobs.files import write_atomic, write_state
from spmd_diffusion.jobs.lock import lock_output
from spmd_diffusion.jobs.manifest import (
    MANIFEST_NAME,
    ManifestWriter,
    fingerprint,
    is_done,
    read_manifest,
    shards_listed,
)
from spmd_diffusion.jobs.options import GenerateOptions
from spmd_diffusion.jobs.outputs import IMAGES_DIR, ImageFileSink
from spmd_diffusion.jobs.prompts import PromptItem
from spmd_diffusion.jobs.records import (
    ImageRecord,
    ShardEvent,
    describe,
    events_from_json,
    shard_events,
)
from spmd_diffusion.jobs.shards import (
    SHARDS_DIR,
    ShardSink,
    close_open_shards,
    next_attempt,
    remove_unlisted_shards,
)
from spmd_diffusion.jobs.sources import ItemSource, open_source
from spmd_diffusion.models.lora import is_local, lora_identity, parse_lora, parse_loras
from spmd_diffusion.request import OmniDiffusionRequest, check_prompt_length, check_seed
from spmd_diffusion.utils.image_inputs import DATA_URI, IMAGE_FIELDS, URL

logger = logging.getLogger(__name__)

CONTACT_SHEET_IMAGES = 16
OUTPUT_FORMATS = ("files", "webdataset")
SHARDS_INDEX = "shards.txt"

Entry = tuple[PromptItem, OmniDiffusionRequest]


def build_request(
    item: PromptItem,
    options: GenerateOptions,
    run_seed: int,
    config: OmniDiffusionConfig | None = None,
    accepted: list[Any] | None = None,
) -> OmniDiffusionRequest:
    """The item's request: run-wide settings, overridden by the item's own, within the
    config's limits, its seed fixed; input image and LoRA paths resolved against the prompt
    file, and the pipeline checked to take them (``accepted`` caches its call arguments)."""
    settings: dict[str, Any] = {
        "negative_prompt": options.negative_prompt,
        "num_inference_steps": options.steps,
        "guidance_scale": options.guidance,
        "height": options.height,
        "width": options.width,
        "strength": options.strength,
        "num_images_per_prompt": options.images_per_prompt,
        "num_frames": options.num_frames,
        "fps": options.fps,
        "true_cfg_scale": options.true_cfg_scale,
    }
    settings.update(item.settings)
    resolve_input_paths(
        settings, Path(options.prompts_file).parent if options.prompts_file else Path.cwd()
    )
    try:
        if settings.get("seed") is None:
            check_seed(run_seed)
            settings["seed"] = derive_seed(run_seed, item.id)  # one construction, not a replace()
        request = OmniDiffusionRequest(prompt=item.prompt, request_id=item.id, **settings)
        if config is not None:
            config.check_limits(request)
            check_pipeline_takes(request, config, [] if accepted is None else accepted)
            check_sequence_split(request, config)
        return request
    except ValueError as exc:
        raise InputError(f"{item.where or f'item {item.id!r} (line {item.line})'}: {exc}") from None


class RequestBuilder:
    """:func:`build_request` for a stream of items, fast for the common item that has no
    settings of its own: its request is the run-wide one (checked once) with its prompt, id
    and seed. Building and checking each request from scratch cost about 20 us an item on
    the 2-vCPU VM, 20 s of a million-item job's start-up; this path costs a fraction."""

    def __init__(
        self, options: GenerateOptions, run_seed: int, config: OmniDiffusionConfig | None = None
    ) -> None:
        self.options = options
        self.run_seed = run_seed
        self.config = config
        self.template: dict[str, Any] | None = None
        self.shared: OmniDiffusionRequest | None = None
        self.accepted: list[Any] = []  # the pipeline's call arguments, looked up once

    def _template(self, item: PromptItem) -> dict[str, Any]:
        if self.template is None:  # the run-wide settings, checked once (as this item's)
            self.shared = build_request(
                item, self.options, self.run_seed, self.config, self.accepted
            )
            self.template = dict(vars(self.shared))
        return self.template

    def shape_of(self, item: PromptItem) -> OmniDiffusionRequest:
        """A request with the item's batch shape and image count, checked like the item's own,
        but not necessarily its prompt, id or seed: what the planning pass needs to count
        batches (an item without settings shares one such request: no object per item)."""
        if item.settings:
            return build_request(item, self.options, self.run_seed, self.config, self.accepted)
        self._template(item)
        check_item_prompt(item)
        return self.shared

    def __call__(self, item: PromptItem) -> OmniDiffusionRequest:
        if item.settings:
            return build_request(item, self.options, self.run_seed, self.config, self.accepted)
        fields = self._template(item)
        check_item_prompt(item)
        request = OmniDiffusionRequest.__new__(OmniDiffusionRequest)
        vars(request).update(
            fields,
            prompt=item.prompt,
            request_id=item.id,
            seed=derive_seed(self.run_seed, item.id),
            extra={},
        )
        return request


def check_item_prompt(item: PromptItem) -> None:
    """The prompt-length check of a request, for the items that share the run-wide one."""
    try:
        check_prompt_length("prompt", item.prompt)
    except ValueError as exc:
        raise InputError(f"{item.where or f'item {item.id!r} (line {item.line})'}: {exc}") from None


def resolve_input_paths(settings: dict[str, Any], base: Path) -> None:
    """Input image and LoRA paths of a prompt file are relative to the file: made absolute
    here, so every rank finds them whatever its working directory (URLs are left to be
    refused; a LoRA that is no file beside the prompts stays a hub id)."""
    for name in IMAGE_FIELDS:
        value = settings.get(name)
        if (
            isinstance(value, str)
            and not URL.match(value)
            and not DATA_URI.match(value)
            and value.strip()
        ):
            settings[name] = os.path.abspath(base / Path(value).expanduser())
    loras = settings.get("lora")
    if isinstance(loras, (str, list)):
        resolved = []
        for spec in [loras] if isinstance(loras, str) else loras:
            try:
                parsed = parse_lora(spec)
            except ValueError:
                resolved.append(spec)  # refused, with the file and line, when the request is built
                continue
            local = base / Path(parsed.source).expanduser()
            if not Path(parsed.source).is_absolute() and (
                is_local(parsed.source) or local.exists()
            ):
                spec = f"{os.path.abspath(local)}:{parsed.scale}"
            resolved.append(spec)
        settings["lora"] = resolved


def build_requests(
    items: list[PromptItem],
    options: GenerateOptions,
    run_seed: int,
    config: OmniDiffusionConfig | None = None,
) -> list[OmniDiffusionRequest]:
    """One request per item (see :func:`build_request`)."""
    accepted: list[Any] = []
    return [build_request(item, options, run_seed, config, accepted) for item in items]


def check_pipeline_takes(
    request: OmniDiffusionRequest, config: OmniDiffusionConfig, accepted: list[Any]
) -> None:
    """An item's inputs and the pipeline's call agree: input images only for a pipeline that
    takes them, and always for one that needs them; ``extra`` arguments the call names.
    Known before loading from the class name or model_index.json (a hub id's class is only
    known once loaded). The server runs the same check on every request before queueing it."""
    if not accepted:
        from spmd_diffusion.models.loader import call_arguments

        accepted.append(call_arguments(config.model, config.model_class_name))
    if accepted[0] is None:
        return
    name, arguments = accepted[0]
    missing = [field for field in required_inputs(name) if getattr(request, field) is None]
    if missing:
        raise ValueError(
            f"{name} needs {' and '.join(missing)}: it edits an input image "
            "(a text-to-image pipeline needs none)"
        )
    unknown = sorted(set(request.extra) - arguments)
    if unknown:
        raise ValueError(f"{name} takes no argument {', '.join(map(repr, unknown))} (extra)")
    wanted = [
        name
        for name in (*IMAGE_FIELDS, "strength", "num_frames", "true_cfg_scale")
        if getattr(request, name) is not None
    ]
    refused = [field for field in wanted if field not in arguments]
    if "num_frames" in refused:
        raise ValueError(
            f"{name} takes no num_frames: it makes images; num_frames is for video pipelines "
            "(e.g. --model tiny-video, a WanPipeline)"
        )
    if "true_cfg_scale" in refused:
        raise ValueError(
            f"{name} takes no true_cfg_scale: it guides with guidance_scale (true CFG is for "
            "Qwen-Image and Flux pipelines)"
        )
    if refused:
        raise ValueError(
            f"{name} takes no {', '.join(refused)}: load an image-to-image or inpainting pipeline "
            "(e.g. --model-class-name StableDiffusionImg2ImgPipeline or StableDiffusionInpaintPipeline)"
        )


def required_inputs(pipeline: str) -> tuple[str, ...]:
    """The inputs a pipeline class cannot run without, by diffusers' naming (its ``__call__``
    defaults them to None and fails inside: "Input is in incorrect format")."""
    if "Inpaint" in pipeline:
        return ("image", "mask_image")
    if any(part in pipeline for part in ("Img2Img", "ImageToImage", "Image2Image")):
        return ("image",)
    return ()


def check_sequence_split(request: OmniDiffusionRequest, config: OmniDiffusionConfig) -> None:
    """Under --ulysses/--ring, an item's image tokens must split evenly over the sequence
    ranks (known before loading from the VAE's and denoiser's configs; a hub id is not)."""
    ranks = config.ulysses_degree * config.ring_degree
    if ranks == 1:
        return
    from spmd_diffusion.models.geometry import default_size, token_grid

    grid = token_grid(config.model)
    default_height, default_width = default_size(config.model)
    height, width = request.height or default_height, request.width or default_width
    if grid is not None and height and width:
        problem = grid.problem(height, width, ranks)
        if problem is not None:
            raise ValueError(problem)


class GuidanceCheck:
    """``--cfg-parallel`` pays only where an item runs classifier-free guidance: with a pipeline
    whose way of guiding is known (see :mod:`spmd_diffusion.models.guidance`) and no guided
    item, the job is refused before loading (a rank of every pair would idle)."""

    def __init__(self, config: OmniDiffusionConfig) -> None:
        self.rule = self.pipeline = None
        self.guided = False
        if not config.cfg_parallel:
            return
        from spmd_diffusion.models.guidance import guidance_of
        from spmd_diffusion.models.loader import (
            call_defaults,
            declared_pipeline_class,
            denoiser_config,
        )

        self.pipeline = declared_pipeline_class(config.model, config.model_class_name)
        found = denoiser_config(config.model) if self.pipeline else None
        self.rule = guidance_of(self.pipeline, found[1] if found else None)
        self.defaults = call_defaults(config.model, self.pipeline) if self.rule else {}

    def add(self, request: OmniDiffusionRequest) -> None:
        if self.rule is None or self.guided:
            return
        settings = {
            name: getattr(request, name)
            if getattr(request, name) is not None
            else self.defaults.get(name)
            for name in ("guidance_scale", "true_cfg_scale")
        }
        self.guided = self.rule.guided({**settings, "negative_prompt": request.negative_prompt})

    def check(self) -> None:
        if self.rule is not None and not self.guided:
            raise InputError(
                f"--cfg-parallel: no item runs classifier-free guidance, so one rank of every pair "
                f"would idle ({self.rule.describe(self.pipeline)}); drop --cfg-parallel or guide"
            )


def run_settings(options: GenerateOptions, config: OmniDiffusionConfig) -> dict[str, Any]:
    """The run-wide settings that change pixels or files, for the resume fingerprint (model
    and output options only when set, so a plain run's fingerprints stay what they were;
    offload moves weights but changes no pixel, so it is not one of them)."""
    settings = {
        "model_class_name": config.model_class_name,
        "dtype": config.dtype,
        "batch_invariant": config.batch_invariant,
        "images_per_batch": options.images_per_batch,
        "variant": config.variant,
        "revision": config.revision,
    }
    if options.image_format != "png" or options.output_format != "files":
        settings["output"] = {
            "image_format": options.image_format,
            "output_format": options.output_format,
            "quality": options.quality if options.image_format != "png" else None,
        }
    if config.lora:
        settings["lora"] = [lora_identity(spec) for spec in parse_loras(config.lora)]
    if config.quantize is not None and config.quantize_components != ["denoiser"]:
        settings["quantize_components"] = config.quantize_components
    if config.scheduler is not None:
        settings["scheduler"] = {"name": config.scheduler, "options": config.scheduler_options}
    for name in ("vae_tiling", "vae_slicing", "attention_backend", "compile", "cache", "quantize"):
        if getattr(config, name):
            settings[name] = getattr(config, name)
    from spmd_diffusion.models.loader import makes_video

    if makes_video(config.model, config.model_class_name):
        # The default format depends on what is installed: a resume elsewhere must not mix them.
        settings["video"] = {"format": options.encoding.video_format, "quality": options.quality}
    return settings


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output directory the job could not write, before any model loads."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output {str(output_dir)!r} exists and is not a directory")
    for name, kind in (
        (MANIFEST_NAME, "file"),
        ("run.json", "file"),
        (IMAGES_DIR, "directory"),
        (SHARDS_DIR, "directory"),
    ):
        path = output_dir / name
        if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
            raise InputError(f"--output {str(output_dir)!r}: {name} exists and is not a {kind}")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"--output {str(output_dir)!r} is not writable (checked {str(existing)!r})"
        )
    try:  # what the mode bits do not say (/proc, a read-only mount, a full quota): create a file
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise InputError(
            f"--output {str(output_dir)!r}: cannot create files in {str(existing)!r} "
            f"({exc.strerror or exc})"
        ) from None


class IdCheck:
    """Repeated ids, found without keeping the ids: 8 bytes of hash per item (8 MB for a
    million), sorted at the end; only on a repeat is the input read again to name the lines."""

    def __init__(self) -> None:
        self.hashes = array("Q")

    @staticmethod
    def digest(item_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")

    def add(self, item_id: str) -> None:
        self.hashes.append(self.digest(item_id))

    def check(self, source: ItemSource) -> None:
        import numpy as np

        hashes = np.sort(np.frombuffer(self.hashes, dtype=np.uint64))
        repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
        if not repeated:
            return
        first: dict[str, int] = {}
        for item in source:
            if self.digest(item.id) in repeated:
                if item.id in first:
                    raise InputError(
                        f"{source.name}:{item.line}: id {item.id!r} repeats line {first[item.id]}"
                    )
                first[item.id] = item.line


@dataclass
class GeneratePlan:
    """What rank 0 decided before any model loads; the batches are read again, lazily, by
    :meth:`batches`."""

    output_dir: Path
    source: ItemSource
    options: GenerateOptions
    config: OmniDiffusionConfig
    items: int = 0
    images_total: int = 0
    images_to_make: int = 0
    batches_to_run: int = 0
    done: set[tuple[str, int]] = field(default_factory=set)
    attempt: int = 0  # WebDataset shards: this run's attempt number (names its shards)
    lock: Any = None  # the output directory's job lock (jobs.lock), held until the job ends

    def entries(self) -> Iterator[Entry]:
        build = RequestBuilder(self.options, self.config.seed, self.config)
        for item in self.source:
            yield item, build(item)

    def chunks(self) -> Iterator[list[Entry]]:
        """Every fixed batch of the item list (see :func:`iter_chunks`)."""
        return iter_chunks(
            self.entries(), self.options.images_per_batch, request_of=lambda entry: entry[1]
        )

    def needs_running(self, chunk: list[Entry]) -> int:
        """Images of ``chunk`` not done before (a batch is redone whole when any is missing:
        batch composition, and so every pixel, stays what a full run would give)."""
        if not self.done:
            return sum(request.num_images_per_prompt for _, request in chunk)
        return sum(
            (request.request_id, k) not in self.done
            for _, request in chunk
            for k in range(request.num_images_per_prompt)
        )

    def batches(self) -> Iterator[list[Entry]]:
        """The batches this run must run, in item order, read from the input as needed."""
        for chunk in self.chunks():
            if self.needs_running(chunk):
                yield chunk


def _plan_fresh(plan: GeneratePlan, ids: IdCheck) -> None:
    """The planning pass with nothing done before: every item checked and counted, batches
    counted by shape, no request object for an item without settings of its own (the pass
    over a million-line file took 19.5 s building and chunking every request on the loaded
    2-vCPU VM)."""
    build = RequestBuilder(plan.options, plan.config.seed, plan.config)
    counter = ChunkCounter(plan.options.images_per_batch)
    guidance = GuidanceCheck(plan.config)
    shared_key: tuple[Any, ...] | None = None
    for item in plan.source:
        request = build.shape_of(item)
        if request is build.shared:
            shared_key = shared_key or request.batch_key()
            key = shared_key
        else:
            key = request.batch_key()
        guidance.add(request)
        ids.add(item.id)
        plan.items += 1
        plan.images_total += request.num_images_per_prompt
        counter.add(key, request.num_images_per_prompt)
    plan.batches_to_run = counter.chunks
    plan.images_to_make = plan.images_total
    guidance.check()


def _plan_resume(plan: GeneratePlan, latest: dict[tuple[str, int], Any], ids: IdCheck) -> None:
    """The planning pass of a resumed run: each item's request against the manifest; a batch
    runs again when any of its images is not done."""
    settings = run_settings(plan.options, plan.config)
    sizes: dict[str, int | None] = {}
    guidance = GuidanceCheck(plan.config)
    for chunk in plan.chunks():
        for item, request in chunk:
            guidance.add(request)
            ids.add(item.id)
            plan.items += 1
            plan.images_total += request.num_images_per_prompt
            expected = fingerprint(request, plan.config.model, settings)
            plan.done.update(
                (request.request_id, k)
                for k in range(request.num_images_per_prompt)
                if is_done(latest.get((request.request_id, k)), expected, plan.output_dir, sizes)
            )
        missing = plan.needs_running(chunk)
        if missing:
            plan.batches_to_run += 1
            plan.images_to_make += missing
    guidance.check()


def plan_generation(options: GenerateOptions, config: OmniDiffusionConfig) -> GeneratePlan:
    """Everything rank 0 decides before any model loads, in one pass over the input; bad
    input raises InputError."""
    if options.output_format not in OUTPUT_FORMATS:
        raise InputError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)}")
    if options.video_format is not None:
        from spmd_diffusion.jobs.video import check_video_format

        try:
            check_video_format(options.video_format)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    output_dir = Path(options.output)
    check_output_dir(output_dir)
    source = open_source(options.prompts_file, options.prompts, options.columns)
    plan = GeneratePlan(output_dir, source, options, config)
    latest = read_manifest(output_dir / MANIFEST_NAME) if options.resume else {}
    ids = IdCheck()
    if latest:
        _plan_resume(plan, latest, ids)
    else:
        _plan_fresh(plan, ids)
    del latest
    if not plan.items:
        raise InputError(f"no prompts in {source.name}")
    ids.check(source)
    if plan.batches_to_run:
        # After the checks (bad input leaves no directory behind), before anything is written.
        plan.lock = lock_output(output_dir)
    if options.output_format == "webdataset":
        plan.attempt = next_attempt(output_dir)
    return plan


def versions() -> dict[str, str]:
    found = {"spmd_diffusion": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "mpi4py"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


@dataclass
class JobStats:
    images_ok: int = 0
    images_failed: int = 0
    images_arrived: int = 0  # records received (ok, failed or pending in an open shard)
    items_failed: set[str] = field(default_factory=set)
    per_rank: Counter = field(default_factory=Counter)
    sheet: list[ImageRecord] = field(default_factory=list)
    shards_written: int = 0
    stopped: bool = False


@dataclass
class InFlight:
    """A request rank 0 has handed out (or is about to): what its records need."""

    request: OmniDiffusionRequest
    described: dict[str, Any]
    expected: list[int]  # image indices this run must account for


MISSING_LISTED = 1000  # ids of missing images named in run.json (all are counted)


class GenerateJob:
    """Keeps the books of a run: each batch's records arrive (the replica leaders wrote the
    images), rank 0 appends them to the manifest; ``run`` returns the exit code.

    Memory is bounded by the work in flight: a request is registered when its batch is read
    from the input and dropped when its output arrives; images in a shard that is still
    open wait in ``pending`` (at most a shard per leader) until the shard is complete."""

    def __init__(self, plan: GeneratePlan, layout: dict[str, Any]) -> None:
        self.plan = plan
        self.layout = layout
        self.stats = JobStats()
        self.settings = run_settings(plan.options, plan.config)
        self.parallel: dict[str, Any] | None = (
            None  # run.json's "parallel": what each parallel flag did
        )
        self.memory: list[
            dict[str, Any]
        ] = []  # run.json's "memory": each rank's weights, peak and levers
        self.compile_seconds: float | None = None  # with --compile: the slowest rank's compile time
        self.done_by_id: dict[str, set[int]] = {}
        for request_id, index in plan.done:
            self.done_by_id.setdefault(request_id, set()).add(index)
        self.in_flight: dict[str, InFlight] = {}
        self.pending: dict[str, list[ImageRecord]] = {}  # shard path -> records waiting for it

    @property
    def shards(self) -> bool:
        return self.plan.options.output_format == "webdataset"

    def describe(self, item: PromptItem, request: OmniDiffusionRequest) -> dict[str, Any]:
        """What each of the request's image records says about it (see :func:`describe`)."""
        model = self.plan.config.model
        return describe(request, model, fingerprint(request, model, self.settings), item.meta)

    def batches(self) -> Iterator[list[OmniDiffusionRequest]]:
        """The plan's batches, read lazily; each request is registered as in flight."""
        for chunk in self.plan.batches():
            for item, request in chunk:
                done = self.done_by_id.get(request.request_id, ())
                self.in_flight[request.request_id] = InFlight(
                    request,
                    self.describe(item, request),
                    [k for k in range(request.num_images_per_prompt) if k not in done],
                )
            yield [request for _, request in chunk]

    def sink(self, batch: list[OmniDiffusionRequest]) -> ImageFileSink | ShardSink:
        """Where the replica running ``batch`` writes its images (skipping those already done)."""
        options = self.plan.options
        skip = frozenset(
            (r.request_id, k) for r in batch for k in self.done_by_id.get(r.request_id, ())
        )
        counts = {r.request_id: r.num_images_per_prompt for r in batch}
        described = {
            r.request_id: self.in_flight[r.request_id].described
            for r in batch
            if r.request_id in self.in_flight
        }
        if self.shards:
            return ShardSink(
                str(self.plan.output_dir),
                self.plan.attempt,
                options.shard_size,
                counts,
                skip,
                options.encoding,
                described,
            )
        return ImageFileSink(str(self.plan.output_dir), counts, skip, options.encoding, described)

    previous_run: dict[str, Any] | None = None
    first_output: tuple[float, int] | None = None  # (when, images arrived by then)
    load_seconds: float | None = None  # the slowest rank's model load

    def _timing(self, started: float, seconds: float) -> dict[str, Any]:
        """Where the run's time went: start-up before the generate phase (process start, imports,
        launch, loading), the slowest rank's load, the first output (the warm-up batch), and the
        steady-state rate after it (images past the first output over the time past it)."""
        from spmd_diffusion.utils.clock import process_started

        timing: dict[str, Any] = {"startup_s": round(started - process_started(), 3)}
        if self.load_seconds is not None:
            timing["load_s"] = round(self.load_seconds, 3)
        if self.first_output is not None:
            first_at, first_images = self.first_output
            timing["first_output_s"] = round(first_at - started, 3)
            later = self.stats.images_arrived - first_images
            steady = started + seconds - first_at
            if later > 0 and steady > 0:
                timing["steady_images_per_second"] = round(later / steady, 4)
        return timing

    def _write_run_json(
        self,
        status: str,
        started: float,
        seconds: float | None = None,
        missing: list[tuple[str, int]] | None = None,
        missing_count: int = 0,
        error: str | None = None,
    ) -> None:
        stats = self.stats
        made = stats.images_ok + stats.images_failed
        record = {
            "status": status,
            "command": sys.argv,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "config": self.plan.config.to_dict(),
            "options": dataclasses.asdict(self.plan.options),
            "layout": self.layout,
            "versions": versions(),
            "totals": {
                "items": self.plan.items,
                "images": self.plan.images_total,
                "images_skipped_as_done": len(self.plan.done),
                "images_ok": stats.images_ok,
                "images_failed": stats.images_failed,
                "images_missing": missing_count,
                "items_failed": len(stats.items_failed),
                "batches_run": self.plan.batches_to_run,
                "images_per_rank": dict(sorted(stats.per_rank.items())),
                **({"shards_written": stats.shards_written} if self.shards else {}),
            },
        }
        if self.parallel is not None:
            record["parallel"] = self.parallel
        if self.memory:
            record["memory"] = self.memory
        if error is not None:
            record["error"] = error
        if self.previous_run is not None:
            record["attempt"] = self.previous_run.get("attempt", 1) + 1
            record["previous_run"] = self.previous_run
        if missing:
            record["missing"] = [
                {"id": request_id, "index": index} for request_id, index in missing[:MISSING_LISTED]
            ]
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
            record["images_per_second"] = round(made / seconds, 4) if seconds > 0 else None
            record["timing"] = self._timing(started, seconds)
            if self.compile_seconds is not None:
                # Replicas compile at once, on their first batches: the slowest one's compile
                # time is what the run lost to it.
                record["compile_seconds"] = round(self.compile_seconds, 3)
                steady = seconds - self.compile_seconds
                record["images_per_second_excluding_compile"] = (
                    round(made / steady, 4) if steady > 0 else None
                )
        write_state(
            self.plan.output_dir / "run.json",
            (json.dumps(record, indent=2, default=repr, allow_nan=False) + "\n").encode(),
        )

    def _record(
        self,
        flight: InFlight,
        index: int,
        output: DiffusionOutput,
        position: int,
        files: dict[int, dict[str, Any]],
    ) -> ImageRecord:
        """The record of image ``index`` of a request (ok when its file was written; pending
        when it went into a shard that is not complete yet)."""
        request = flight.request
        settings = output.metadata[position]
        record = ImageRecord.made(request.request_id, index, flight.described, output, position)
        record.status = "error"
        record.error = output.errors[position]
        record.seconds = round(
            settings.get("seconds", 0.0) / max(1, request.num_images_per_prompt), 4
        )
        record.rank = settings.get("rank", output.rank)
        written = files.get(index)
        if record.error is None and written is not None:
            record.wrote(written)
            record.status = "pending" if record.key is not None else "ok"
        else:
            record.error = record.error or "no image returned"
        return record

    def _count(self, record: ImageRecord) -> None:
        """A final record (ok or error) into the totals."""
        if record.status == "ok":
            self.stats.images_ok += 1
            self.stats.per_rank[record.rank] += 1
            if len(self.stats.sheet) < CONTACT_SHEET_IMAGES:
                self.stats.sheet.append(record)
        else:
            self.stats.images_failed += 1
            self.stats.items_failed.add(record.id)

    def _shard_events(self, events: list[ShardEvent]) -> list[ImageRecord]:
        """Records that are final now: those of shards just completed (ok, with the shard's
        size) or lost (error)."""
        records = []
        for event in events:
            if event.closed:
                self.stats.shards_written += 1
            for record in self.pending.pop(event.path, ()):
                if event.closed:
                    record.status, record.shard_bytes = "ok", event.bytes
                else:
                    record.status = "error"
                    record.error = f"its shard could not be written: {event.error}"
                    record.path = None
                records.append(record)
        return records

    def _records(self, output: DiffusionOutput) -> list[ImageRecord]:
        """The manifest lines one batch output makes final, counted into the job's totals."""
        records = []
        for position, request_id in enumerate(output.request_ids):
            flight = self.in_flight.pop(request_id, None)
            if flight is None:
                continue  # not an item of this run, or already accounted for
            files = {entry["index"]: entry for entry in output.metadata[position].get("files", ())}
            for index in flight.expected:
                record = self._record(flight, index, output, position, files)
                self.stats.images_arrived += 1
                if record.status == "pending":
                    self.pending.setdefault(record.path, []).append(record)
                else:
                    records.append(record)
        records += self._shard_events(shard_events(output))
        for record in records:
            self._count(record)
        return records

    def _close_shards(self, engine: Any, writer: ManifestWriter) -> None:
        """Every leader closes its last shard; their images get their lines."""
        attempt = self.plan.attempt
        results = engine.collective_rpc(
            close_open_shards, args=(str(self.plan.output_dir), attempt)
        )
        results.append(
            close_open_shards(None, str(self.plan.output_dir), attempt)
        )  # sinks that ran here
        for events in results:
            records = self._shard_events(events_from_json(events))
            for record in records:
                self._count(record)
            writer.append([record.to_json() for record in records])

    def _prepare_shards(self) -> None:
        """Before writing: delete partial shards and those no ok manifest line lists (their
        images are not done, so they are made again into new shards)."""
        listed = (
            shards_listed(self.plan.output_dir / MANIFEST_NAME)
            if self.plan.options.resume
            else set()
        )
        removed = remove_unlisted_shards(self.plan.output_dir, listed)
        if removed:
            logger.info(
                "removed %d partial or unlisted shard(s); their images are made again", removed
            )

    def _write_shard_index(self) -> None:
        """``shards.txt``: every complete shard the manifest lists, one path a line (what
        ``webdataset.WebDataset`` takes)."""
        listed = sorted(
            path
            for path in shards_listed(self.plan.output_dir / MANIFEST_NAME)
            if (self.plan.output_dir / path).is_file()
        )
        write_atomic(
            self.plan.output_dir / SHARDS_INDEX, "".join(f"{path}\n" for path in listed).encode()
        )

    def run(self, engine: Any) -> int:
        from tqdm import tqdm

        plan = self.plan
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        self.previous_run = (
            previous_run(plan.output_dir / "run.json") if plan.options.resume else None
        )
        self._write_run_json("running", started)
        if self.shards:
            self._prepare_shards()
        writer = ManifestWriter(plan.output_dir, fresh=not plan.options.resume)
        if plan.done:
            logger.info("resuming: %d of %d images already done", len(plan.done), plan.images_total)
        bar = tqdm(
            total=plan.images_to_make,
            unit="img",
            desc="generate",
            dynamic_ncols=True,
            file=sys.stderr,
        )

        def on_output(output: DiffusionOutput) -> bool:
            before = self.stats.images_arrived
            writer.append([record.to_json() for record in self._records(output)])
            bar.update(self.stats.images_arrived - before)
            if (
                self.first_output is None
            ):  # the first batch carries the warm-up (kernels, allocator)
                self.first_output = (time.time(), self.stats.images_arrived)
            if plan.options.fail_fast and self.stats.images_failed:
                self.stats.stopped = True
                return False
            return True

        try:
            engine.generate_stream(self.batches(), on_output, sinks=self.sink)
            if self.shards:
                self._close_shards(engine, writer)
        except KeyboardInterrupt:
            self._write_run_json("interrupted", started, time.time() - started)
            raise
        except Exception as exc:  # a fault that ends the job (a worker died, a timeout): say so
            self._write_run_json(
                "failed", started, time.time() - started, error=f"{type(exc).__name__}: {exc}"
            )
            raise
        finally:
            bar.close()
            writer.close()
        seconds = time.time() - started
        if self.shards:
            try:
                self._write_shard_index()
            except OutputWriteError as exc:  # the books cannot be closed: the job stops here
                self._write_run_json("failed", started, seconds, error=str(exc))
                raise
        stats = engine.collective_rpc(
            "get_cache_stats"
        )  # one call at the end: memory, parallel, compile
        self.memory = [
            rank["memory"] for rank in stats if isinstance(rank, dict) and rank.get("memory")
        ]
        loads = [
            float(rank["load_seconds"])
            for rank in stats
            if isinstance(rank, dict) and "load_seconds" in rank
        ]
        self.load_seconds = max(loads) if loads else None
        if plan.config.replica_size > 1:
            from spmd_diffusion.parallel import (
                merge_parallel_stats,
            )  # torch: only where a replica has ranks

            self.parallel = merge_parallel_stats(stats)
        if plan.config.compile:
            self.compile_seconds = max(float(rank.get("compile_seconds", 0.0)) for rank in stats)
        if self.stats.sheet:
            ordered = sorted(
                self.stats.sheet, key=lambda record: (record.id, record.index)
            )  # not arrival
            try:
                write_contact_sheet(
                    plan.output_dir / "contact_sheet.png",
                    [(record.id, self._sheet_image(record)) for record in ordered],
                )
            except (
                OutputWriteError
            ) as exc:  # a convenience: the images and their records are what counts
                logger.warning("no contact sheet: %s", exc)
        missing = sorted(
            [
                (request_id, k)
                for request_id, flight in self.in_flight.items()
                for k in flight.expected
            ]
            + [(record.id, record.index) for records in self.pending.values() for record in records]
        )
        missing_count = plan.images_to_make - self.stats.images_ok - self.stats.images_failed
        status = self._status(missing, missing_count)
        self._write_run_json(status, started, seconds, missing, missing_count)
        self._print_summary(seconds, missing, missing_count)
        return EXIT_OK if status == "complete" else EXIT_PARTIAL

    def _sheet_image(self, record: ImageRecord) -> Path | io.BytesIO:
        """An ok image for the contact sheet: its file, or its member of a shard."""
        path = self.plan.output_dir / record.path
        if record.member is None:
            return path
        with tarfile.open(path) as tar:
            member = tar.extractfile(record.member)
            data = io.BytesIO(member.read() if member is not None else b"")
        data.name = record.member  # the contact sheet reads the format from the name
        return data

    def _status(self, missing: list[tuple[str, int]], missing_count: int) -> str:
        """complete; stopped (--fail-fast); incomplete (images with no record at all: work was
        lost, never a success); items_failed."""
        if self.stats.stopped:
            return "stopped"
        if missing or missing_count > 0:
            logger.error(
                "%d planned image(s) have no record: %s",
                max(missing_count, len(missing)),
                ", ".join(f"{i}[{k}]" for i, k in missing[:20])
                + (" ..." if len(missing) > 20 else ""),
            )
            return "incomplete"
        return "items_failed" if self.stats.items_failed else "complete"

    def _print_summary(
        self, seconds: float, missing: list[tuple[str, int]], missing_count: int
    ) -> None:
        stats, made = self.stats, self.stats.images_ok + self.stats.images_failed
        rows = [
            ("items", self.plan.items),
            ("images ok", stats.images_ok),
            ("images failed", stats.images_failed),
            ("images already done", len(self.plan.done)),
            ("seconds", f"{seconds:.1f}"),
            ("images/s", f"{made / seconds:.2f}" if seconds > 0 else "-"),
        ]
        if self.compile_seconds is not None:
            steady = seconds - self.compile_seconds
            rows += [
                ("compile seconds", f"{self.compile_seconds:.1f}"),
                ("images/s excluding compile", f"{made / steady:.2f}" if steady > 0 else "-"),
            ]
        rows += [
            (
                "layout",
                f"{self.layout.get('replicas', 1)} replica(s) x {self.layout.get('replica_size', 1)} rank(s)",
            ),
            *(parallel_rows(self.parallel) if self.parallel is not None else []),
            *memory_rows(self.memory),
        ]
        if self.shards:
            rows.append(("shards written", stats.shards_written))
        if missing_count > 0:
            rows.append(
                (
                    "images missing",
                    f"{missing_count}: " + ", ".join(sorted({i for i, _ in missing})[:10]),
                )
            )
        rows += [
            (f"images by rank {rank}", count) for rank, count in sorted(stats.per_rank.items())
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        print(
            "summary\n" + "\n".join(lines) + f"\n  output: {self.plan.output_dir}", file=sys.stderr
        )


def memory_rows(memory: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Summary rows: each rank's peak memory and the denoiser's weights, and the levers on."""
    if not memory:
        return []
    mib = 2**20

    def peak(rank: dict[str, Any]) -> str:
        if "peak_allocated_bytes" in rank:
            return f"{rank['peak_allocated_bytes'] / mib:.0f} MiB allocated ({rank['peak_reserved_bytes'] / mib:.0f} reserved)"
        return f"{rank['peak_rss_bytes'] / mib:.0f} MiB resident"

    rows = [
        (
            f"memory rank {rank['rank']}",
            f"peak {peak(rank)}, denoiser weights "
            f"{rank.get('denoiser_weight_bytes', 0) / mib:.1f} MiB",
        )
        for rank in memory[:8]
    ]
    levers = memory[0].get("levers") or {}
    rows.append(
        ("memory levers", ", ".join(f"{name}={value}" for name, value in levers.items()) or "none")
    )
    return rows


def parallel_rows(merged: dict[str, Any]) -> list[tuple[str, str]]:
    from spmd_diffusion.parallel import parallel_summary

    return parallel_summary(merged)


def previous_run(path: Path) -> dict[str, Any] | None:
    """What ``path`` (run.json) says of the run before this one. A run still marked
    ``running`` was killed without closing its books (SIGKILL, a lost node, a requeue that
    did not wait): it is reported as ``killed``, so the job's history never claims a run
    that no longer exists."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    status = record.get("status")
    if status == "running":
        status = "killed"
        logger.warning(
            "the previous run (started %s) ended without closing its books: it was killed; resuming",
            record.get("started_at", "?"),
        )
    summary = {
        "status": status,
        "started_at": record.get("started_at"),
        "attempt": record.get("attempt", 1),
        "totals": record.get("totals"),
    }
    if record.get("error"):
        summary["error"] = record["error"]
    return summary
