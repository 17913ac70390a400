"""The records of a batch job, each declared once and both written and read through its type.

An :class:`ImageRecord` is what is known of one image: what it is (id, prompt, seed, every
setting it was made with; :meth:`ImageRecord.info`, written inside the image file and beside
it in a shard) and where it landed (path, status, content hash; :meth:`ImageRecord.to_json`,
its manifest line). The manifest is read back through :meth:`ImageRecord.from_json`, so the
writer and the reader of a line cannot drift apart.

A :class:`ShardEvent` is a leader's news of one of its WebDataset shards: complete (its size)
or lost (why). A batch output carries its leader's events in its ``notes["shards"]``
(:func:`with_shard_events`, :func:`shard_events`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.image_inputs import IMAGE_FIELDS


class _Absent:
    """A key the record leaves out (unlike None, which it writes as null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()

# What the engine side knows of a request before its batch runs, which the worker's own
# settings (``output.metadata[position]``) override where it reports them.
DESCRIBED = (
    "prompt",
    "negative_prompt",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "true_cfg_scale",
    "height",
    "width",
    "image",
    "mask_image",
    "strength",
    "model",
    "fingerprint",
    "meta",
)
# Fields a resume reads from a manifest line (see ``ImageRecord.from_json(brief=True)``).
RESUME_FIELDS = ("fingerprint", "path", "bytes", "shard_bytes")
EVENTS_KEY = "shards"  # in an output's notes: {"closed": [...], "failed": [...]}


def describe(
    request: OmniDiffusionRequest, model: str, fingerprint: str, meta: dict[str, Any]
) -> dict[str, Any]:
    """What the engine side knows of a request's images before its batch runs (keys of
    :data:`DESCRIBED`; travels with the batch's sink): an image-to-image or inpainting item's
    input paths and strength too (the strength the pipeline used comes back with the batch)."""
    described = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "true_cfg_scale": request.true_cfg_scale,
        "height": request.height,
        "width": request.width,
        "model": model,
        "fingerprint": fingerprint,
        "meta": meta,
    }
    if request.image is not None:
        described.update(
            {
                name: getattr(request, name)
                for name in IMAGE_FIELDS
                if getattr(request, name) is not None
            },
            strength=request.strength,
        )
    return described


@dataclass(slots=True)
class ImageRecord:
    """One image of one request. Optional settings are left out of the JSON when the image
    was made without them (``true_cfg_scale`` is ``ABSENT`` when the pipeline takes none, None
    when it ignored the value); the outcome fields are set once the image was written."""

    id: str
    index: int
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: Any = ABSENT
    height: int | None = None
    width: int | None = None
    image: str | None = None  # image-to-image and inpainting: the input paths and strength
    mask_image: str | None = None
    strength: float | None = None
    scheduler: str | None = None
    lora: list[dict[str, Any]] | None = None
    cache: Any = None
    quantize: Any = None
    num_frames: int | None = None
    fps: int | None = None
    model: str | None = None
    fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Where it landed (the manifest line).
    path: str | None = None
    status: str | None = None  # ok, error, or pending (in a shard not complete yet)
    error: str | None = None
    seconds: float | None = None
    rank: int | None = None
    key: str | None = None  # in a shard: the sample's key and member name
    member: str | None = None
    sha256: str | None = None  # the written file (or member): hash, size and writer
    bytes: int | None = None
    written_by: int | None = None
    shard_bytes: int | None = None  # in a complete shard: the shard's size

    @classmethod
    def made(
        cls,
        request_id: str,
        index: int,
        described: dict[str, Any],
        output: DiffusionOutput,
        position: int,
    ) -> ImageRecord:
        """Image ``index`` of the request at ``position`` of ``output``: its seed and the
        settings the worker used, else those ``described`` (the engine's view, keys of
        :data:`DESCRIBED`) says. Built where the image is written and where its line is, so
        both say the same."""
        settings = output.metadata[position] if output.metadata else {}
        seeds = output.seeds[position] if output.seeds else []
        seed = seeds[index] if index < len(seeds) else None
        if seed is None and described.get("seed") is not None:
            seed = described["seed"] + index
        image = described.get("image")
        return cls(
            id=request_id,
            index=index,
            prompt=described.get("prompt"),
            negative_prompt=described.get("negative_prompt"),
            seed=seed,
            num_inference_steps=settings.get(
                "num_inference_steps", described.get("num_inference_steps")
            ),
            guidance_scale=settings.get("guidance_scale", described.get("guidance_scale")),
            true_cfg_scale=settings.get("true_cfg_scale", ABSENT),
            height=settings.get("height", described.get("height")),
            width=settings.get("width", described.get("width")),
            image=image,
            mask_image=described.get("mask_image") if image is not None else None,
            strength=settings.get("strength", described.get("strength"))
            if image is not None
            else None,
            scheduler=settings.get("scheduler"),
            lora=settings.get("lora") or None,
            cache=settings.get("cache") or None,
            quantize=settings.get("quantize") or None,
            num_frames=settings.get("num_frames"),
            fps=settings.get("fps"),
            model=described.get("model"),
            fingerprint=described.get("fingerprint"),
            meta=described.get("meta", {}),
        )

    def _what(self) -> dict[str, Any]:
        """What the image is, in the manifest's key order (``meta`` excluded)."""
        what: dict[str, Any] = {
            "id": self.id,
            "index": self.index,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.true_cfg_scale is not ABSENT:
            what["true_cfg_scale"] = self.true_cfg_scale
        what["height"] = self.height
        what["width"] = self.width
        if self.image is not None:
            what["image"] = self.image
            if self.mask_image is not None:
                what["mask_image"] = self.mask_image
            what["strength"] = self.strength
        what["scheduler"] = self.scheduler
        for name in ("lora", "cache", "quantize", "num_frames", "fps"):
            value = getattr(self, name)
            if value is not None:
                what[name] = value
        what["model"] = self.model
        what["fingerprint"] = self.fingerprint
        return what

    def info(self) -> dict[str, Any]:
        """What the image is: the JSON written inside its file and beside it in a shard."""
        return {**self._what(), "meta": self.meta}

    def to_json(self) -> dict[str, Any]:
        """The manifest line."""
        line = {
            **self._what(),
            "path": self.path,
            "status": self.status,
            "error": self.error,
            "seconds": self.seconds,
            "rank": self.rank,
            "meta": self.meta,
        }
        if self.key is not None:
            line["key"] = self.key
            line["member"] = self.member
        if self.sha256 is not None:
            line.update(sha256=self.sha256, bytes=self.bytes, written_by=self.written_by)
        if self.shard_bytes is not None:
            line["shard_bytes"] = self.shard_bytes
        return line

    @classmethod
    def from_json(cls, line: dict[str, Any], brief: bool = False) -> ImageRecord:
        """A manifest line read back (KeyError, ValueError or TypeError when it is no image
        record). ``brief`` keeps only what a resume reads (:data:`RESUME_FIELDS`), so the
        latest lines of a million-image manifest do not hold every prompt."""
        record = cls(str(line["id"]), int(line["index"]), status=str(line["status"]))
        record.fingerprint = str(line.get("fingerprint", ""))
        record.path = line.get("path")
        for name in ("bytes", "shard_bytes"):
            if line.get(name) is not None:
                setattr(record, name, int(line[name]))
        if brief:
            return record
        for name in DESCRIBED + (
            "scheduler",
            "lora",
            "cache",
            "quantize",
            "num_frames",
            "fps",
            "error",
            "seconds",
            "rank",
            "key",
            "member",
            "sha256",
            "written_by",
        ):
            if name in line and name != "fingerprint":
                setattr(record, name, line[name])
        return record

    def wrote(self, written: dict[str, Any]) -> None:
        """Take a sink's record of the file (or shard member) it wrote for this image."""
        self.path = written["path"]
        self.key = written.get("key")
        self.member = written.get("member")
        self.sha256 = written["sha256"]
        self.bytes = written["bytes"]
        self.written_by = written["written_by"]


@dataclass(frozen=True)
class ShardEvent:
    """A shard closed complete (``bytes``, ``images``) or lost (``error``)."""

    path: str
    bytes: int | None = None
    images: int | None = None
    error: str | None = None

    @property
    def closed(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        if self.closed:
            return {"path": self.path, "bytes": self.bytes, "images": self.images}
        return {"path": self.path, "error": self.error}


def events_to_json(events: list[ShardEvent]) -> dict[str, list[dict[str, Any]]]:
    """The wire form of a leader's events: ``{"closed": [...], "failed": [...]}``."""
    return {
        "closed": [event.to_json() for event in events if event.closed],
        "failed": [event.to_json() for event in events if not event.closed],
    }


def events_from_json(wire: dict[str, list[dict[str, Any]]]) -> list[ShardEvent]:
    """The events of :func:`events_to_json`, closed ones first."""
    return [
        ShardEvent(entry["path"], bytes=entry["bytes"], images=entry.get("images"))
        for entry in wire.get("closed", ())
    ] + [ShardEvent(entry["path"], error=entry["error"]) for entry in wire.get("failed", ())]


def with_shard_events(output: DiffusionOutput, events: list[ShardEvent]) -> DiffusionOutput:
    """``output`` carrying its leader's shard events to rank 0 (in its ``notes``)."""
    return dataclasses.replace(output, notes={**output.notes, EVENTS_KEY: events_to_json(events)})


def shard_events(output: DiffusionOutput) -> list[ShardEvent]:
    """The shard events a batch output carries (none for file output)."""
    return events_from_json(output.notes.get(EVENTS_KEY, {}))
