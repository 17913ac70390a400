"""Planning a batch job: everything rank 0 decides before any model loads.

One pass over the input, a record at a time, checks every item, fixes its seed, counts the
fixed batches (by the engine's packing rule) and what a previous run finished; the plan then
reads the input again, lazily, for the batches to run (:meth:`GeneratePlan.batches`). Neither
pass holds the item list.
"""

# ruff: noqa: PLC0415 - numpy, the model-file readers and the video encoders are heavy or
# optional: imported where used

from __future__ import annotations

import hashlib
import os
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.engine.batching import iter_chunks
from spmd_diffusion.errors import InputError
from spmd_diffusion.jobs.lock import lock_output
from spmd_diffusion.jobs.manifest import MANIFEST_NAME, fingerprint, is_done, read_manifest
from spmd_diffusion.jobs.options import GenerateOptions
from spmd_diffusion.jobs.outputs import IMAGES_DIR
from spmd_diffusion.jobs.prompts import PromptItem
from spmd_diffusion.jobs.records import ImageRecord
from spmd_diffusion.jobs.requests import RequestBuilder
from spmd_diffusion.jobs.shards import SHARDS_DIR, next_attempt
from spmd_diffusion.jobs.sources import ItemSource, open_source
from spmd_diffusion.models.lora import lora_identity, parse_loras
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.packing import Packer

OUTPUT_FORMATS = ("files", "webdataset")

Entry = tuple[PromptItem, OmniDiffusionRequest]


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

    @property
    def shards(self) -> bool:
        """WebDataset output: the images go into tar shards."""
        return self.options.output_format == "webdataset"

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
    counted by shape with the packing rule, no request object for an item without settings of
    its own (building and chunking every request would dominate a million-line plan)."""
    build = RequestBuilder(plan.options, plan.config.seed, plan.config)
    counter: Packer[None] = Packer(plan.options.images_per_batch)  # counts, keeps nothing
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


def _plan_resume(
    plan: GeneratePlan, latest: dict[tuple[str, int], ImageRecord], ids: IdCheck
) -> None:
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
