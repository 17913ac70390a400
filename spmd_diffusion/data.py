"""Configuration and output types shared by the engine, executors and workers.

Both are plain dataclasses that validate on construction, so a bad value fails on rank 0
with a message naming the field, before any process is spawned or any model is loaded.
The configuration's parts and their fields are in :mod:`spmd_diffusion.config_parts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from spmd_diffusion import option_checks
from spmd_diffusion.config_parts import (
    DEFAULT_MODEL,
    DTYPE_ALIASES,
    DTYPES,
    OFFLOAD_MODES,
    PARTS,
    LimitsConfig,
    ModelConfig,
    OptimizationConfig,
    ParallelConfig,
    RuntimeConfig,
)
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.image_inputs import check_image_inputs
from spmd_diffusion.utils.images import ImageLike, decode_image, encode_image

if TYPE_CHECKING:
    from spmd_diffusion.layout import ParallelLayout

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "DTYPE_ALIASES",
    "OFFLOAD_MODES",
    "Deferred",
    "DiffusionOutput",
    "LimitsConfig",
    "ModelConfig",
    "OmniDiffusionConfig",
    "OptimizationConfig",
    "OutputsPending",
    "ParallelConfig",
    "RuntimeConfig",
    "StepNote",
]

# Old flat names -> their names in the parts (both taken and read).
FLAT_ALIASES = {"schedule": "batch_policy", "max_batch_size": "max_images_per_batch"}
PART_OF = {f.name: part for part, kind in PARTS.items() for f in fields(kind)}
FLAT_NAMES = tuple(PART_OF)


def qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


@dataclass(init=False)
class OmniDiffusionConfig:
    """How to load the model and how to run it, in five parts (``config_parts.py`` documents
    every field once): ``model_config`` (what to load), ``parallel_config`` (the executor and
    the replica layout), ``limits_config`` (what a request may ask), ``runtime_config`` (seeds,
    batches, hooks, deadlines) and ``optimization_config`` (memory and speed switches).

    Built from the parts, from the flat keywords of every field (``OmniDiffusionConfig(
    model="tiny-dit", tensor_parallel_size=2)``), or both (the keywords then override the
    parts' fields); every field also reads as a flat attribute (``config.tensor_parallel_size``).
    Two fields were renamed to say what they are, and their old names are still taken and
    read: ``schedule`` is ``batch_policy`` (the batch policy, not the noise ``scheduler``) and
    ``max_batch_size`` is ``max_images_per_batch`` (it counts images; a batch size counts
    prompts). ``executor_class`` is None (the launcher's executor,
    else the multi-process one), a registered name (``mp``, ``uni``, ``mpi``, ``torchrun``,
    ``http``, or an entry point of the group ``spmd_diffusion.executors``), a dotted path
    string, or a class. Options a custom executor needs go in ``executor_config``; they read
    as attributes of the config (``config.api_key``) so executors can treat them like
    built-in fields.
    """

    model_config: ModelConfig
    parallel_config: ParallelConfig
    limits_config: LimitsConfig
    runtime_config: RuntimeConfig
    optimization_config: OptimizationConfig

    def __init__(
        self,
        model_config: ModelConfig | None = None,
        parallel_config: ParallelConfig | None = None,
        limits_config: LimitsConfig | None = None,
        runtime_config: RuntimeConfig | None = None,
        optimization_config: OptimizationConfig | None = None,
        **flat: Any,
    ) -> None:
        given = {
            "model_config": model_config,
            "parallel_config": parallel_config,
            "limits_config": limits_config,
            "runtime_config": runtime_config,
            "optimization_config": optimization_config,
        }
        overrides: dict[str, dict[str, Any]] = {part: {} for part in PARTS}
        for name, value in flat.items():
            name = FLAT_ALIASES.get(name, name)
            if name not in PART_OF:
                raise TypeError(
                    f"OmniDiffusionConfig got an unexpected keyword argument {name!r} "
                    "(a custom executor's options go in executor_config)"
                )
            overrides[PART_OF[name]][name] = value
        for part, kind in PARTS.items():
            base = given[part]
            if base is not None and not isinstance(base, kind):
                raise ValueError(f"{part} must be a {kind.__name__}, got {type(base).__name__}")
            value = kind(**overrides[part]) if base is None else replace(base, **overrides[part])
            object.__setattr__(self, part, value)
        self.check_across_parts()

    def check_across_parts(self) -> None:
        """What one part alone cannot tell: options that do not go together."""
        if self.lora and self.tensor_parallel_size > 1:
            raise ValueError(
                "lora is not supported with tensor parallelism (the adapters would wrap "
                "sharded layers)"
            )
        if self.offload is not None and (self.replica_size > 1 or self.device == "cpu"):
            raise ValueError(
                "offload moves whole models between the CPU and one accelerator: it needs a GPU "
                "and works without tensor/CFG parallelism"
            )
        if self.vae_parallel and self.replica_size == 1:
            raise ValueError(
                "vae_parallel splits a decode over the ranks of a replica, and a replica here is "
                "one rank: add --tp, --ulysses, --ring or --cfg-parallel (more data-parallel "
                "ranks already decode other images)"
            )
        if self.vae_parallel and (self.vae_tiling or self.vae_slicing):
            raise ValueError(
                "vae_parallel decodes whole bands of the image: it replaces vae_tiling/"
                "vae_slicing, use one or the other"
            )
        if self.quantize is not None and self.tensor_parallel_size > 1:
            raise ValueError(
                "quantize with tensor parallelism: the sharded layers would be DTensors over "
                "quantized weights, which the quantization backends do not support; use "
                "--quantize with data, sequence or CFG parallelism"
            )

    def check_limits(self, request: OmniDiffusionRequest) -> None:
        """Refuse a request past this config's limits (a typo such as height 100000 would
        hold a replica for hours), before any work is sent anywhere; its input images must
        exist, be images and fit the size limit (only their headers are read)."""
        for name in ("height", "width"):
            value = getattr(request, name)
            if value is not None and value > self.max_image_size:
                raise ValueError(
                    f"{name} {value} is above the limit of {self.max_image_size} (max_image_size)"
                )
        steps = request.num_inference_steps
        if steps is not None and steps > self.max_inference_steps:
            raise ValueError(
                f"num_inference_steps {steps} is above the limit of {self.max_inference_steps} "
                "(max_inference_steps)"
            )
        if request.num_images_per_prompt > self.max_images_per_prompt:
            raise ValueError(
                f"num_images_per_prompt {request.num_images_per_prompt} is above the limit of "
                f"{self.max_images_per_prompt} (max_images_per_prompt)"
            )
        check_image_inputs(request, self.max_image_size)
        if request.lora is not None:
            if request.lora and self.tensor_parallel_size > 1:
                raise ValueError("lora is not supported with tensor parallelism")
            option_checks.check("lora_sources", request.lora)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: serve executor options as attributes.
        if not name.startswith("_"):
            parallel = self.__dict__.get("parallel_config")
            extra = parallel.executor_config if parallel is not None else {}
            if name in extra:
                return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def replica_size(self) -> int:
        """Ranks that work on one image together: tensor x cfg x sequence (ulysses x ring)."""
        return self.parallel_config.replica_size

    def parallel_layout(self, world_size: int) -> ParallelLayout:
        """How ``world_size`` ranks (or workers) split into replicas under this config; a clear
        ``ValueError`` when tp x cfg x sp does not divide them."""
        return self.parallel_config.parallel_layout(world_size)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-safe dict; a class in ``executor_class`` becomes its dotted path."""
        data = {name: getattr(self, name) for name in FLAT_NAMES}
        if isinstance(self.executor_class, type):
            data["executor_class"] = qualified_name(self.executor_class)
        data["executor_config"] = dict(self.executor_config)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniDiffusionConfig:
        """Build a config from flat keys; unknown keys go to ``executor_config`` (they are
        executor options)."""
        known = set(FLAT_NAMES) | set(FLAT_ALIASES)
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            kwargs["executor_config"] = {**kwargs.get("executor_config", {}), **extra}
        return cls(**kwargs)


def flat_field(part: str, name: str) -> property:
    """``config.<name>``: the field of one part, read and set through the whole config."""

    def read(self: OmniDiffusionConfig) -> Any:
        return getattr(getattr(self, part), name)

    def write(self: OmniDiffusionConfig, value: Any) -> None:
        setattr(getattr(self, part), name, value)

    return property(read, write, doc=f"``{part}.{name}``")


for _name, _part in PART_OF.items():
    setattr(OmniDiffusionConfig, _name, flat_field(_part, _name))
for _old, _new in FLAT_ALIASES.items():
    setattr(OmniDiffusionConfig, _old, flat_field(PART_OF[_new], _new))


@dataclass
class DiffusionOutput:
    """The results of one or more requests, in request order.

    ``images[i]`` and ``seeds[i]`` belong to ``request_ids[i]``; ``errors[i]`` is None when
    that request succeeded, else the error text (a failed request never hides the others).
    ``metadata[i]`` holds the generation settings the worker actually used and its timing.
    ``notes`` is what the batch's sink tells the job beside the records (a shard sink's news
    of its shards); ``to_dict`` leaves it out while empty.
    """

    request_ids: list[str] = field(default_factory=list)
    images: list[list[ImageLike]] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    seeds: list[list[int]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rank: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.request_ids)
        if not self.images:
            self.images = [[] for _ in range(n)]
        if not self.errors:
            self.errors = [None] * n
        if not self.seeds:
            self.seeds = [[] for _ in range(n)]
        if not self.metadata:
            self.metadata = [{} for _ in range(n)]
        for name in ("images", "errors", "seeds", "metadata"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"DiffusionOutput.{name} has {len(getattr(self, name))} entries "
                    f"for {n} request ids"
                )

    @property
    def ok(self) -> bool:
        return all(error is None for error in self.errors)

    def _single(self, name: str) -> Any:
        if len(self.request_ids) != 1:
            raise ValueError(
                f"{name} is defined for one request, this output holds {len(self.request_ids)}"
            )
        return getattr(self, name + "s")[0]

    @property
    def request_id(self) -> str:
        return self._single("request_id")

    @property
    def error(self) -> str | None:
        return self._single("error")

    def split(self) -> list[DiffusionOutput]:
        """One output per request (timings and rank are shared by the whole batch)."""
        return [
            DiffusionOutput(
                request_ids=[rid],
                images=[self.images[i]],
                errors=[self.errors[i]],
                seeds=[self.seeds[i]],
                metadata=[self.metadata[i]],
                timings=dict(self.timings),
                rank=self.rank,
            )
            for i, rid in enumerate(self.request_ids)
        ]

    @classmethod
    def failed(cls, request_ids: list[str], error: str, rank: int | None = None) -> DiffusionOutput:
        return cls(request_ids=list(request_ids), errors=[error] * len(request_ids), rank=rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: images as base64 PNG (PIL) or base64 raw arrays (numpy)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["images"] = [[encode_image(im) for im in per_request] for per_request in self.images]
        if not self.notes:
            del data["notes"]  # the shape every earlier reader of this dict knows
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionOutput:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionOutput field(s): {', '.join(unknown)}")
        kwargs = dict(data)
        kwargs["images"] = [
            [decode_image(im) for im in per_request] for per_request in data.get("images", [])
        ]
        return cls(**kwargs)


class StepNote(NamedTuple):
    """A running batch's progress: ``step`` of ``steps`` done in the pipeline call making
    ``request_ids``. The replica leader sends it as an extra reply before the batch's answer
    (where the engine asked for progress; see ``worker/step_watch.py``)."""

    request_ids: tuple[str, ...]
    step: int
    steps: int


class OutputsPending(NamedTuple):
    """A replica leader's note that its batch is denoised and handed to its output writer:
    the replica may start its next batch while the files are written. The batch's answer
    (its records, once the files are durable) follows from the writer."""


class Deferred:
    """What a worker call returns when its answer follows later, from another thread (the
    output writer): the serve loop sends nothing for it."""


DEFERRED = Deferred()
