"""LoRA adapters through diffusers' own ``load_lora_weights`` and ``set_adapters``.

A spec is ``PATH_OR_ID[:scale]`` (scale 1 when left out): a local file or directory written
by diffusers' ``save_lora_weights``, or a hub id. The run's adapters (``--lora``) are loaded
with the pipeline; an item may name its own set (JSONL ``lora``), loaded on first use and
kept, so switching sets between batches costs a ``set_adapters`` call. Items with different
sets never share a batch (their ``batch_key`` differs).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spmd_diffusion.models.loader import HUB_ID


@dataclass(frozen=True)
class LoraSpec:
    source: str
    scale: float = 1.0

    @property
    def adapter_name(self) -> str:
        """The same source always gets the same name, on every rank."""
        return "lora_" + hashlib.sha1(self.source.encode()).hexdigest()[:12]


def parse_lora(spec: str) -> LoraSpec:
    """``PATH_OR_ID[:scale]``; the part after the last ':' is a scale only when it is a number."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a LoRA is PATH_OR_ID[:scale], got {spec!r}")
    source, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            source = head
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {tail!r} in {spec!r}")
    return LoraSpec(source, scale)


def parse_loras(specs: Any, name: str = "lora") -> list[LoraSpec]:
    """A list of specs (a single string is a list of one); one source at most once."""
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, (list, tuple)):
        raise ValueError(
            f"{name} must be a list of PATH_OR_ID[:scale] strings, got {type(specs).__name__}"
        )
    parsed = [parse_lora(spec) for spec in specs]
    sources = [spec.source for spec in parsed]
    repeated = sorted({source for source in sources if sources.count(source) > 1})
    if repeated:
        raise ValueError(f"{name} names {', '.join(repeated)} more than once")
    return parsed


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_local(source: str) -> bool:
    """A path rather than a hub id: it exists, starts like a path, or names a weights file."""
    return (
        source.startswith(("/", ".", "~"))
        or source.lower().endswith(WEIGHT_SUFFIXES)
        or Path(source).expanduser().exists()
    )


def check_lora_source(source: str) -> None:
    """Rank 0, before loading: a local LoRA must exist; anything else must look like a hub id."""
    if is_local(source):
        if not Path(source).expanduser().exists():
            raise ValueError(f"LoRA {source!r} does not exist")
    elif not HUB_ID.match(source):
        raise ValueError(f"LoRA {source!r} is neither an existing path nor a hub id (org/name)")


def lora_identity(spec: LoraSpec) -> dict[str, Any]:
    """What stands for an adapter in a resume fingerprint: its source and scale, and for a
    local one its files' sizes and modification times (a retrained LoRA means redo)."""
    identity: dict[str, Any] = {"source": spec.source, "scale": spec.scale}
    path = Path(spec.source).expanduser()
    if path.is_file():
        stat = path.stat()
        identity["files"] = [[path.name, stat.st_size, stat.st_mtime_ns]]
    elif path.is_dir():
        identity["files"] = sorted(
            [entry.name, entry.stat().st_size, entry.stat().st_mtime_ns]
            for entry in path.iterdir()
            if entry.is_file()
        )
    return identity


class LoraAdapters:
    """The adapters loaded into one pipeline, and which set is active.

    ``max_loaded`` bounds how many stay loaded (a server's per-request adapters): past it the
    least recently used one that the wanted set does not name is deleted from the pipeline
    (``delete_adapters``) and reloaded from its file when asked for again. ``pinned``: the
    run's own adapters, never evicted."""

    def __init__(
        self, pipeline: Any, max_loaded: int | None = None, pinned: tuple[str, ...] = ()
    ) -> None:
        self.pipeline = pipeline
        self.max_loaded = max_loaded
        self.pinned = set(pinned)
        self.loaded: dict[str, None] = {}  # adapter names, least recently used first
        self.active: tuple[LoraSpec, ...] | None = None
        self.evictions = 0

    def _evict_for(self, wanted: tuple[LoraSpec, ...]) -> None:
        keep = self.pinned | {spec.adapter_name for spec in wanted}
        while self.max_loaded is not None and len(self.loaded) >= self.max_loaded:
            victim = next((name for name in self.loaded if name not in keep), None)
            if victim is None:
                return
            self.pipeline.delete_adapters(victim)
            del self.loaded[victim]
            self.evictions += 1
            self.active = None  # the active set may have named it

    def _load(self, spec: LoraSpec, wanted: tuple[LoraSpec, ...] = ()) -> None:
        if spec.adapter_name in self.loaded:
            self.loaded[spec.adapter_name] = self.loaded.pop(
                spec.adapter_name
            )  # most recently used
            return
        if not hasattr(self.pipeline, "load_lora_weights"):
            raise ValueError(f"{type(self.pipeline).__name__} does not load LoRA weights")
        source = os.path.expanduser(spec.source)
        path = Path(source)
        if path.is_file():  # diffusers takes a directory plus weight_name for one file
            self._evict_for(wanted)
            self.pipeline.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=spec.adapter_name
            )
        else:
            self._evict_for(wanted)
            self.pipeline.load_lora_weights(source, adapter_name=spec.adapter_name)
        self.loaded[spec.adapter_name] = None

    def activate(self, specs: list[LoraSpec]) -> None:
        """Make ``specs`` (with their scales) the active set; an empty list: the base model."""
        wanted = tuple(specs)
        if wanted == self.active:
            return
        for spec in wanted:
            self._load(spec, wanted)
        if not wanted:
            if self.loaded:
                self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(
                [spec.adapter_name for spec in wanted],
                adapter_weights=[spec.scale for spec in wanted],
            )
        self.active = wanted
