"""The parts of :class:`~spmd_diffusion.data.OmniDiffusionConfig`, one concept each (as
vLLM-Omni nests its diffusion config): what to load, how the ranks split, what a request may
ask, how the engine runs, and what trades pixels or memory for speed.

Each part is a dataclass that checks its own fields on construction, so a bad value fails on
rank 0 with a message naming the field; checks that span parts live in ``data.py``. Every
field is documented here once (its comment); the flat ``OmniDiffusionConfig`` keywords and
attributes are these names. Nothing here imports the layers above (``models/``...): checks
that need them are handed in by :mod:`spmd_diffusion.option_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spmd_diffusion import option_checks
from spmd_diffusion.layout import ParallelLayout
from spmd_diffusion.request import MAX_SEED

DEFAULT_MODEL = "tiny-unet"
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
OFFLOAD_MODES = ("model", "sequential", "group")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_timeout(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")


def check_name(name: str, value: Any, what: str) -> None:
    """None or a non-empty string."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def as_list(value: Any) -> Any:
    """A tuple (what click gives) as a list; anything else as it is (then checked)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass
class ModelConfig:
    """What to load: the pipeline, its weights' form, and what is loaded with it."""

    model: str = DEFAULT_MODEL  # pipeline directory, hub id or embedded tiny model name
    model_class_name: str | None = None  # diffusers pipeline class (None: model_index.json's)
    revision: str | None = None  # hub revision of the weights
    variant: str | None = None  # weights variant (e.g. fp16 files)
    dtype: str = "auto"  # auto (float16 on GPUs, float32 on CPUs) or a dtype name/alias
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    lora: list[str] = field(default_factory=list)  # run-wide adapters, PATH_OR_ID[:scale]
    max_loras: int | None = None  # adapters kept loaded per replica (LRU); None: every one used
    scheduler: str | None = None  # noise scheduler: a diffusers scheduler class name
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # its from_config options

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.model_class_name is not None and (
            not isinstance(self.model_class_name, str) or not self.model_class_name.isidentifier()
        ):
            raise ValueError(
                f"model_class_name must be a class name, got {self.model_class_name!r}"
            )
        dtype = DTYPE_ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else None
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.dtype = dtype
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            )
        self.lora = as_list(self.lora)
        option_checks.check("lora", self.lora)
        if self.max_loras is not None and (
            isinstance(self.max_loras, bool)
            or not isinstance(self.max_loras, int)
            or self.max_loras < max(1, len(self.lora))
        ):
            raise ValueError(
                f"max_loras must be an integer >= 1 and >= the run's own adapters "
                f"({len(self.lora)}), got {self.max_loras!r}"
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
                "scheduler_options must be a dict of option names to values, "
                f"got {self.scheduler_options!r}"
            )
        if self.scheduler_options and self.scheduler is None:
            raise ValueError("scheduler_options need a scheduler")


@dataclass
class ParallelConfig:
    """Who runs it: the executor and how its ranks split into replicas."""

    executor_class: Any = None  # None (by launcher), a registered name, a dotted path or a class
    executor_config: dict[str, Any] = field(default_factory=dict)  # a custom executor's options
    num_gpus: int = 1  # workers of the mp and ray executors (without a launcher)
    tensor_parallel_size: int = 1  # ranks sharding each layer of the denoiser
    cfg_parallel: bool = False  # the two guidance branches on two ranks
    ulysses_degree: int = 1  # sequence-parallel ranks exchanging heads all-to-all
    ring_degree: int = 1  # sequence-parallel ranks passing key/value chunks around a ring
    vae_parallel: bool = False  # each VAE decode split into bands over the replica's ranks

    def __post_init__(self) -> None:
        if self.executor_class is not None and not isinstance(self.executor_class, (str, type)):
            raise ValueError(
                "executor_class must be None, a registered name, a dotted path or a class, "
                f"got {type(self.executor_class).__name__}"
            )
        if not isinstance(self.executor_config, dict):
            raise ValueError(
                f"executor_config must be a dict, got {type(self.executor_config).__name__}"
            )
        check_int("num_gpus", self.num_gpus, 1)
        for name in ("tensor_parallel_size", "ulysses_degree", "ring_degree"):
            check_int(name, getattr(self, name), 1)
        for name in ("cfg_parallel", "vae_parallel"):
            check_bool(name, getattr(self, name))

    @property
    def replica_size(self) -> int:
        """Ranks that work on one image together: tensor x cfg x sequence (ulysses x ring)."""
        return (
            self.tensor_parallel_size
            * (2 if self.cfg_parallel else 1)
            * self.ulysses_degree
            * self.ring_degree
        )

    def parallel_layout(self, world_size: int) -> ParallelLayout:
        """How ``world_size`` ranks (or workers) split into replicas; a clear ``ValueError``
        when tp x cfg x sp does not divide them."""
        return ParallelLayout(
            world_size,
            tp=self.tensor_parallel_size,
            cfg=2 if self.cfg_parallel else 1,
            ulysses=self.ulysses_degree,
            ring=self.ring_degree,
        )


@dataclass
class LimitsConfig:
    """What one request may ask for (a typo such as height 100000 would hold a replica for
    hours): refused before any work is sent anywhere."""

    max_image_size: int = 4096  # largest height or width
    max_inference_steps: int = 1000  # most denoising steps
    max_images_per_prompt: int = 64  # most images of one prompt

    def __post_init__(self) -> None:
        for name in ("max_image_size", "max_inference_steps", "max_images_per_prompt"):
            check_int(name, getattr(self, name), 1)


@dataclass
class RuntimeConfig:
    """How the engine runs the work: seeds, batches, hooks and deadlines."""

    seed: int = 0  # run seed: items without their own derive theirs from it and their id
    # Most images in one pipeline call (a batch); ``max_batch_size`` is its old name. A batch
    # size (``generate --batch-size``) counts prompts: batch-size x images-per-prompt images.
    max_images_per_batch: int = 4
    batch_policy: str = "shape"  # which batch a free replica gets: fifo, shape, cost, dotted path
    batch_wait_s: float = 0.005  # how long a partial batch waits for same-shape work (serve)
    batch_invariant: bool = False  # one sample per forward pass: images independent of batches
    hooks: list[str] = field(default_factory=list)  # monitoring hooks: names or dotted paths
    torch_num_threads: int | None = None  # intra-op threads per rank (None: 1 on CPUs)
    rpc_timeout: float | None = 300.0  # seconds an RPC may take (None: no limit)
    generate_timeout: float | None = 3600.0  # seconds one generate call may take
    startup_timeout: float | None = 900.0  # seconds every rank may take to load the model
    batch_timeout: float | None = None  # seconds a batch may take (None: from the pace seen)
    # One pipeline call per replica before the timed work, its images dropped: the first
    # call's one-off costs (kernel selection, autotuning, allocator growth) then stay out of
    # the throughput. None: where the replica's device is a GPU.
    warmup: bool | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {self.seed!r}")
        check_int("max_images_per_batch (max_batch_size)", self.max_images_per_batch, 1)
        if not isinstance(self.batch_policy, str) or not self.batch_policy:
            raise ValueError(
                "batch_policy (schedule) must be fifo, shape, cost or a dotted path, "
                f"got {self.batch_policy!r}"
            )
        if (
            isinstance(self.batch_wait_s, bool)
            or not isinstance(self.batch_wait_s, (int, float))
            or not 0 <= self.batch_wait_s <= 10
        ):
            raise ValueError(
                f"batch_wait_s must be a number of seconds in [0, 10], got {self.batch_wait_s!r}"
            )
        check_bool("batch_invariant", self.batch_invariant)
        self.hooks = as_list(self.hooks)
        if not isinstance(self.hooks, list) or not all(
            isinstance(h, str) and h for h in self.hooks
        ):
            raise ValueError(
                f"hooks must be a list of hook names or dotted paths, got {self.hooks!r}"
            )
        check_int("torch_num_threads", self.torch_num_threads, 1, allow_none=True)
        if self.warmup is not None:
            check_bool("warmup", self.warmup)
        for name in ("rpc_timeout", "generate_timeout", "startup_timeout", "batch_timeout"):
            check_timeout(name, getattr(self, name))


@dataclass
class OptimizationConfig:
    """Memory and speed switches of the loaded pipeline (some change pixels slightly)."""

    offload: str | None = None  # diffusers CPU offload: model, sequential or group
    vae_tiling: bool = False  # decode in tiles
    vae_slicing: bool = False  # decode one image at a time
    attention_backend: str | None = None  # diffusers attention dispatcher backend
    compile: bool = False  # torch.compile the denoiser
    cache: str | None = None  # step cache KIND[:VALUE] (normalised: the value made explicit)
    quantize: str | None = None  # quantized weights: a torchao or bitsandbytes kind
    quantize_components: list[str] = field(default_factory=lambda: ["denoiser"])

    def __post_init__(self) -> None:
        for name in ("vae_tiling", "vae_slicing", "compile"):
            check_bool(name, getattr(self, name))
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ValueError(
                f"offload must be None or one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}"
            )
        check_name("attention_backend", self.attention_backend, "a backend name")
        if self.cache is not None:
            self.cache = option_checks.check("cache", self.cache)
        components = self.quantize_components
        if isinstance(components, str):
            components = [components]
        self.quantize_components = as_list(components)
        if (
            not isinstance(self.quantize_components, list)
            or not self.quantize_components
            or not all(isinstance(name, str) and name for name in self.quantize_components)
        ):
            raise ValueError(
                "quantize_components must be a non-empty list of component names, "
                f"got {self.quantize_components!r}"
            )
        if self.quantize is not None:
            option_checks.check("quantize", self.quantize)


PARTS: dict[str, type] = {
    "model_config": ModelConfig,
    "parallel_config": ParallelConfig,
    "limits_config": LimitsConfig,
    "runtime_config": RuntimeConfig,
    "optimization_config": OptimizationConfig,
}
