"""Configuration and output types shared by the engine, executors and workers.

Both are plain dataclasses that validate on construction, so a bad value fails on rank 0
with a message naming the field, before any process is spawned or any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

from spmd_diffusion.request import MAX_SEED, OmniDiffusionRequest
from spmd_diffusion.utils.images import ImageLike, decode_image, encode_image

if TYPE_CHECKING:
    from spmd_diffusion.parallel.mesh import ParallelLayout

DEFAULT_MODEL = "tiny-unet"
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
OFFLOAD_MODES = ("model", "sequential", "group")


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_timeout(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


@dataclass
class OmniDiffusionConfig:
    """How to load the model and how to run it.

    ``executor_class`` is None (the launcher's executor, else the multi-process one), a
    registered name (``mp``, ``uni``, ``mpi``, ``torchrun``, ``http``, or an entry point of the
    group ``spmd_diffusion.executors``), a dotted path string, or a class.
    ``torch_num_threads=None`` means one intra-op thread per rank on CPUs: float results
    depend on the thread count, and it must not change with the number of ranks.
    ``batch_invariant=True`` runs every forward pass one sample at a time, so an image does
    not depend on how many prompts shared its pipeline call (see batch_invariance.py). Options a custom
    executor needs go in ``executor_config``; they read as attributes of the config
    (``config.api_key``) so executors can treat them like built-in fields.
    """

    model: str = DEFAULT_MODEL
    model_class_name: str | None = None
    executor_class: Any = None
    executor_config: dict[str, Any] = field(default_factory=dict)
    num_gpus: int = 1
    tensor_parallel_size: int = 1
    cfg_parallel: bool = False
    ulysses_degree: int = 1
    ring_degree: int = 1
    vae_parallel: bool = False
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_batch_size: int = 4
    batch_invariant: bool = False
    torch_num_threads: int | None = None
    revision: str | None = None
    variant: str | None = None
    rpc_timeout: float | None = 300.0
    generate_timeout: float | None = 3600.0
    startup_timeout: float | None = 900.0
    batch_timeout: float | None = None
    max_image_size: int = 4096
    max_inference_steps: int = 1000
    max_images_per_prompt: int = 64
    schedule: str = "shape"
    hooks: list[str] = field(default_factory=list)
    batch_wait_s: float = 0.005
    lora: list[str] = field(default_factory=list)
    max_loras: int | None = None  # adapters kept loaded per replica (LRU); None: every one used
    scheduler: str | None = None
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    offload: str | None = None
    vae_tiling: bool = False
    vae_slicing: bool = False
    attention_backend: str | None = None
    compile: bool = False
    cache: str | None = None
    quantize: str | None = None
    quantize_components: list[str] = field(default_factory=lambda: ["denoiser"])

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.model_class_name is not None and (
            not isinstance(self.model_class_name, str) or not self.model_class_name.isidentifier()
        ):
            raise ValueError(
                f"model_class_name must be a class name, got {self.model_class_name!r}"
            )
        if self.executor_class is not None and not isinstance(self.executor_class, (str, type)):
            raise ValueError(
                "executor_class must be None, a registered name, a dotted path or a class, "
                f"got {type(self.executor_class).__name__}"
            )
        if not isinstance(self.executor_config, dict):
            raise ValueError(
                f"executor_config must be a dict, got {type(self.executor_config).__name__}"
            )
        _check_int("num_gpus", self.num_gpus, 1)
        for name in ("tensor_parallel_size", "ulysses_degree", "ring_degree"):
            _check_int(name, getattr(self, name), 1)
        for name in (
            "cfg_parallel",
            "batch_invariant",
            "vae_tiling",
            "vae_slicing",
            "compile",
            "vae_parallel",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        dtype = (
            DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.dtype = dtype
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        _check_int("max_batch_size", self.max_batch_size, 1)
        for name in ("max_image_size", "max_inference_steps", "max_images_per_prompt"):
            _check_int(name, getattr(self, name), 1)
        _check_int("torch_num_threads", self.torch_num_threads, 1, allow_none=True)
        for name in ("rpc_timeout", "generate_timeout", "startup_timeout", "batch_timeout"):
            _check_timeout(name, getattr(self, name))
        if not isinstance(self.schedule, str) or not self.schedule:
            raise ValueError(
                f"schedule must be fifo, shape, cost or a dotted path, got {self.schedule!r}"
            )
        if not isinstance(self.hooks, list) or not all(
            isinstance(h, str) and h for h in self.hooks
        ):
            raise ValueError(
                f"hooks must be a list of hook names or dotted paths, got {self.hooks!r}"
            )
        if (
            isinstance(self.batch_wait_s, bool)
            or not isinstance(self.batch_wait_s, (int, float))
            or not 0 <= self.batch_wait_s <= 10
        ):
            raise ValueError(
                f"batch_wait_s must be a number of seconds in [0, 10], got {self.batch_wait_s!r}"
            )
        self._check_model_options()

    def _check_model_options(self) -> None:
        """Shapes only (no diffusers import here); names are checked against the installed
        diffusers by ``spmd_diffusion.models.options.check_model_options``."""
        from spmd_diffusion.models.lora import parse_loras

        if isinstance(self.lora, tuple):
            self.lora = list(self.lora)
        parse_loras(self.lora)
        if self.max_loras is not None and (
            isinstance(self.max_loras, bool)
            or not isinstance(self.max_loras, int)
            or self.max_loras < max(1, len(self.lora))
        ):
            raise ValueError(
                f"max_loras must be an integer >= 1 and >= the run's own adapters ({len(self.lora)}), "
                f"got {self.max_loras!r}"
            )
        if self.lora and self.tensor_parallel_size > 1:
            raise ValueError(
                "lora is not supported with tensor parallelism (the adapters would wrap sharded layers)"
            )
        if self.scheduler is not None and (
            not isinstance(self.scheduler, str) or not self.scheduler.isidentifier()
        ):
            raise ValueError(
                f"scheduler must be a diffusers scheduler class name, got {self.scheduler!r}"
            )
        if not isinstance(self.scheduler_options, dict) or not all(
            isinstance(k, str) for k in self.scheduler_options
        ):
            raise ValueError(
                f"scheduler_options must be a dict of option names to values, got {self.scheduler_options!r}"
            )
        if self.scheduler_options and self.scheduler is None:
            raise ValueError("scheduler_options need a scheduler")
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ValueError(
                f"offload must be None or one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}"
            )
        if self.offload is not None and (self.replica_size > 1 or self.device == "cpu"):
            raise ValueError(
                "offload moves whole models between the CPU and one accelerator: it needs a GPU and "
                "works without tensor/CFG parallelism"
            )
        if self.vae_parallel and self.replica_size == 1:
            raise ValueError(
                "vae_parallel splits a decode over the ranks of a replica, and a replica here is one "
                "rank: add --tp, --ulysses, --ring or --cfg-parallel (more data-parallel ranks already "
                "decode other images)"
            )
        if self.vae_parallel and (self.vae_tiling or self.vae_slicing):
            raise ValueError(
                "vae_parallel decodes whole bands of the image: it replaces vae_tiling/vae_slicing, "
                "use one or the other"
            )
        if self.attention_backend is not None and (
            not isinstance(self.attention_backend, str) or not self.attention_backend
        ):
            raise ValueError(
                f"attention_backend must be a backend name, got {self.attention_backend!r}"
            )
        if self.cache is not None:
            from spmd_diffusion.models.step_cache import parse_cache

            self.cache = str(
                parse_cache(self.cache)
            )  # normalised: the kind's default value made explicit
        self._check_quantize()

    def _check_quantize(self) -> None:
        """Shapes only; the kind's package and whether this machine runs it are checked by
        ``spmd_diffusion.models.options.check_model_options``."""
        if isinstance(self.quantize_components, (tuple, str)):
            self.quantize_components = (
                [self.quantize_components]
                if isinstance(self.quantize_components, str)
                else list(self.quantize_components)
            )
        if (
            not isinstance(self.quantize_components, list)
            or not self.quantize_components
            or not all(isinstance(name, str) and name for name in self.quantize_components)
        ):
            raise ValueError(
                f"quantize_components must be a non-empty list of component names, "
                f"got {self.quantize_components!r}"
            )
        if self.quantize is None:
            return
        from spmd_diffusion.models.quantization import KINDS

        if self.quantize not in KINDS:
            raise ValueError(f"quantize must be one of {', '.join(KINDS)}, got {self.quantize!r}")
        if self.tensor_parallel_size > 1:
            raise ValueError(
                "quantize with tensor parallelism: the sharded layers would be DTensors over quantized "
                "weights, which the quantization backends do not support; use --quantize with data, "
                "sequence or CFG parallelism"
            )

    def check_limits(self, request: OmniDiffusionRequest) -> None:
        """Refuse a request past this config's limits (a typo such as height 100000 would
        hold a replica for hours), before any work is sent anywhere; its input images must
        exist, be images and fit the size limit (only their headers are read)."""
        from spmd_diffusion.utils.image_inputs import check_image_inputs

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
            from spmd_diffusion.models.lora import check_lora_source, parse_loras

            if request.lora and self.tensor_parallel_size > 1:
                raise ValueError("lora is not supported with tensor parallelism")
            for spec in parse_loras(request.lora):
                check_lora_source(spec.source)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: serve executor options as attributes.
        if not name.startswith("_"):
            extra = self.__dict__.get("executor_config") or {}
            if name in extra:
                return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def replica_size(self) -> int:
        """Ranks that work on one image together: tensor x cfg x sequence (ulysses x ring) parallel."""
        return (
            self.tensor_parallel_size
            * (2 if self.cfg_parallel else 1)
            * self.ulysses_degree
            * self.ring_degree
        )

    def parallel_layout(self, world_size: int) -> ParallelLayout:
        """How ``world_size`` ranks (or workers) split into replicas under this config; a clear
        ``ValueError`` when tp x cfg x sp does not divide them."""
        from spmd_diffusion.parallel.mesh import ParallelLayout

        return ParallelLayout(
            world_size,
            tp=self.tensor_parallel_size,
            cfg=2 if self.cfg_parallel else 1,
            ulysses=self.ulysses_degree,
            ring=self.ring_degree,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; a class in ``executor_class`` becomes its dotted path."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.executor_class, type):
            data["executor_class"] = qualified_name(self.executor_class)
        data["executor_config"] = dict(self.executor_config)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniDiffusionConfig:
        """Build a config; unknown keys go to ``executor_config`` (they are executor options)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            kwargs["executor_config"] = {**kwargs.get("executor_config", {}), **extra}
        return cls(**kwargs)


@dataclass
class DiffusionOutput:
    """The results of one or more requests, in request order.

    ``images[i]`` and ``seeds[i]`` belong to ``request_ids[i]``; ``errors[i]`` is None when
    that request succeeded, else the error text (a failed request never hides the others).
    ``metadata[i]`` holds the generation settings the worker actually used and its timing.
    """

    request_ids: list[str] = field(default_factory=list)
    images: list[list[ImageLike]] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    seeds: list[list[int]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rank: int | None = None

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
                    f"DiffusionOutput.{name} has {len(getattr(self, name))} entries for {n} request ids"
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
