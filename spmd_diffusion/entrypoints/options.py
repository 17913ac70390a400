"""Every run-wide option of the commands, declared once.

One :class:`Option` says a value's name, type, default, bounds and help, which commands take
it, and where its value goes (``config``: an :class:`~spmd_diffusion.data.OmniDiffusionConfig`
field; ``run``: a :class:`~spmd_diffusion.jobs.options.GenerateOptions` field; ``command``:
read by the command itself). From this table come the click options of ``generate``,
``serve``, ``info`` and ``worker`` and the keys of their ``--config`` file (a flag's name
without its dashes, see ``cli_options.py``). The per-item settings (steps, guidance, size, ...)
are declared in :mod:`spmd_diffusion.request_settings`, which also gives the HTTP fields and
the prompt-file keys; their ``generate`` flags join this table through :func:`setting_option`.

No framework is imported here: the surfaces turn an :class:`Option` into their own types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spmd_diffusion.data import DEFAULT_MODEL, DTYPES, OFFLOAD_MODES
from spmd_diffusion.request_settings import FLAG_SETTINGS, Setting

MODEL_COMMANDS = frozenset({"generate", "serve", "info", "worker"})
LAYOUT_COMMANDS = frozenset({"generate", "serve"})
GENERATE = frozenset({"generate"})
SERVE = frozenset({"serve"})
WORKER = frozenset({"worker"})


@dataclass(frozen=True)
class Option:
    """One option. ``name``: where its value goes (a config or run field, or the command's
    keyword); ``flags``: the CLI flags, the first one the canonical (config-file key), the
    others old names still taken; ``kind``: ``str``, ``int``, ``float``, ``flag`` (a bool),
    ``file`` or ``dir`` (paths); ``multiple``: repeatable (a list in a config file)."""

    name: str
    flags: tuple[str, ...]
    kind: str
    help: str
    commands: frozenset[str]
    target: str = "config"  # config, run or command
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    choices: tuple[str, ...] | None = None
    multiple: bool = False
    metavar: str | None = None
    required: bool = False
    off_flag: str | None = None  # --no-resume: a flag that sets it false
    short: str | None = None  # -o
    envvar: str | None = None
    comma_list: bool = False  # one string of comma-separated names, given as a list

    @property
    def keys(self) -> tuple[str, ...]:
        """Its config-file keys: every flag's name without the dashes."""
        return tuple(flag.removeprefix("--") for flag in self.flags)


def setting_option(setting: Setting) -> Option:
    """The ``generate`` flag of a per-item setting: its run-wide value (items may override)."""
    assert setting.flag is not None
    return Option(
        setting.flag.removeprefix("--").replace("-", "_"),
        (setting.flag,),
        "str" if setting.kind == "text" else setting.kind,
        setting.help,
        GENERATE,
        target="run",
        minimum=setting.minimum,
        maximum=setting.maximum,
        open_minimum=setting.open_minimum,
    )


MODEL_OPTIONS = (
    Option(
        "model",
        ("--model",),
        "str",
        "Pipeline directory, hub id, or an embedded tiny model: tiny-unet, tiny-sdxl, tiny-dit, "
        "tiny-sd3, tiny-flux, tiny-qwen-image, tiny-sana, tiny-video, tiny-ltx.",
        MODEL_COMMANDS,
        default=DEFAULT_MODEL,
    ),
    Option(
        "model_class_name",
        ("--model-class-name",),
        "str",
        "diffusers pipeline class to load with (default: from model_index.json).",
        MODEL_COMMANDS,
    ),
    Option(
        "executor_class",
        ("--executor",),
        "str",
        "Executor: mp, uni, ray, a registered name, or a dotted path (default: by launcher).",
        MODEL_COMMANDS,
    ),
    Option(
        "num_gpus",
        ("--num-gpus",),
        "int",
        "Workers of the mp and ray executors (without a launcher): one per GPU, or CPU workers.",
        MODEL_COMMANDS,
        default=1,
    ),
    Option(
        "dtype",
        ("--dtype",),
        "str",
        "Weights dtype; auto is float16 on GPUs, float32 on CPUs.",
        MODEL_COMMANDS,
        default="auto",
        choices=DTYPES,
    ),
    Option(
        "device", ("--device",), "str", "auto, cpu, cuda or cuda:N.", MODEL_COMMANDS, default="auto"
    ),
    Option(
        "seed",
        ("--seed",),
        "int",
        "Run seed: items without their own seed derive theirs from it and their id.",
        MODEL_COMMANDS,
        default=0,
    ),
    Option(
        "batch_size",
        ("--batch-size",),
        "int",
        "Prompts per batch; a batch is one pipeline call of batch-size x images-per-prompt images.",
        GENERATE,
        target="run",
        default=4,
        minimum=1,
    ),
    Option(
        "max_images_per_batch",
        ("--max-images-per-batch", "--batch-size"),
        "int",
        "Most images in one pipeline call (requests of the same shape share a call; "
        "--batch-size: the old name).",
        MODEL_COMMANDS - GENERATE,
        default=4,
        minimum=1,
    ),
    Option(
        "torch_num_threads",
        ("--threads",),
        "int",
        "torch intra-op threads per rank (CPU default: 1, for layout-independent results).",
        MODEL_COMMANDS,
        minimum=1,
    ),
    Option(
        "max_image_size",
        ("--max-image-size",),
        "int",
        "Largest height or width a request may ask for.",
        MODEL_COMMANDS,
        default=4096,
        minimum=8,
    ),
    Option(
        "max_inference_steps",
        ("--max-steps",),
        "int",
        "Most denoising steps a request may ask for.",
        MODEL_COMMANDS,
        default=1000,
        minimum=1,
    ),
    Option(
        "max_images_per_prompt",
        ("--max-images-per-prompt",),
        "int",
        "Most images one prompt may ask for.",
        MODEL_COMMANDS,
        default=64,
        minimum=1,
    ),
    Option(
        "batch_policy",
        ("--batch-policy", "--schedule"),
        "str",
        "Which batch a free replica gets: fifo, shape (same-shape work together), cost "
        "(longest first), or a dotted path to your own policy class (--schedule: the old name).",
        MODEL_COMMANDS,
        default="shape",
        metavar="POLICY",
    ),
    Option(
        "startup_timeout",
        ("--startup-timeout",),
        "float",
        "Seconds every rank may take to load the model (and join its groups).",
        MODEL_COMMANDS,
        default=900.0,
        minimum=1,
    ),
    Option(
        "batch_timeout",
        ("--batch-timeout",),
        "float",
        "Seconds a batch may take once its replica has made one (a stuck rank then ends the "
        "job, exit 1, naming it). Default: 10x the slowest pace seen so far for the batch's "
        "images x steps, at least 120 s; a replica's first batch may take up to an hour.",
        MODEL_COMMANDS,
        minimum=0.1,
        metavar="SECONDS",
    ),
    Option(
        "hooks",
        ("--hook",),
        "str",
        "Monitoring hook (repeatable): prometheus, trace:FILE, an entry point of "
        "spmd_diffusion.hooks, or a dotted path to a class.",
        MODEL_COMMANDS,
        multiple=True,
        metavar="HOOK",
    ),
    Option(
        "lora",
        ("--lora",),
        "str",
        "LoRA adapter (repeatable): a save_lora_weights file or directory, or a hub id; "
        "scale 1 by default.",
        MODEL_COMMANDS,
        multiple=True,
        metavar="PATH_OR_ID[:SCALE]",
    ),
    Option(
        "scheduler",
        ("--scheduler",),
        "str",
        "Noise scheduler: a diffusers scheduler class (e.g. EulerDiscreteScheduler), built "
        "from the pipeline's scheduler config.",
        MODEL_COMMANDS,
        metavar="CLASS",
    ),
    Option(
        "scheduler_options",
        ("--scheduler-option",),
        "str",
        "Noise scheduler option (repeatable); VALUE is read as JSON, else as a string.",
        MODEL_COMMANDS,
        multiple=True,
        metavar="KEY=VALUE",
    ),
    Option(
        "offload",
        ("--offload",),
        "str",
        "diffusers CPU offload (needs a GPU): model (whole models, small slowdown), group "
        "(groups of blocks, copies overlapped on a CUDA stream) or sequential (layer by layer: "
        "least memory, slow).",
        MODEL_COMMANDS,
        choices=OFFLOAD_MODES,
    ),
    Option(
        "quantize",
        ("--quantize",),
        "str",
        "Quantized weights through diffusers' quantization configs: int8wo, int8dq, int4wo, "
        "float8wo, float8dq (torchao), bnb-nf4, bnb-int8 (bitsandbytes); a kind this machine "
        "cannot run is refused before loading.",
        MODEL_COMMANDS,
        metavar="KIND",
    ),
    Option(
        "quantize_components",
        ("--quantize-components",),
        "str",
        "Comma-separated pipeline components to quantize (denoiser: the transformer or unet; "
        "e.g. denoiser,text_encoder_2).",
        MODEL_COMMANDS,
        default="denoiser",
        metavar="NAMES",
        comma_list=True,
    ),
    Option(
        "vae_tiling",
        ("--vae-tiling",),
        "flag",
        "Decode the VAE in tiles (large images, less memory).",
        MODEL_COMMANDS,
        default=False,
    ),
    Option(
        "vae_slicing",
        ("--vae-slicing",),
        "flag",
        "Decode the VAE one image at a time (less memory).",
        MODEL_COMMANDS,
        default=False,
    ),
    Option(
        "attention_backend",
        ("--attention-backend",),
        "str",
        "diffusers attention dispatcher backend: native, flash, sage, ... (where installed).",
        MODEL_COMMANDS,
        metavar="NAME",
    ),
    Option(
        "warmup",
        ("--warmup",),
        "flag",
        "One pipeline call per replica before the timed work, its images dropped (kernel "
        "selection, autotuning and allocator growth stay out of images/s; run.json "
        "timing.warmup_s). Default: on where the device is a GPU.",
        LAYOUT_COMMANDS,
        default=None,
        off_flag="--no-warmup",
    ),
    Option(
        "compile",
        ("--compile",),
        "flag",
        "torch.compile the denoiser (compile time is reported apart from throughput).",
        MODEL_COMMANDS,
        default=False,
    ),
    Option(
        "cache",
        ("--cache",),
        "str",
        "Step cache through diffusers' hooks: first-block[:threshold], taylorseer[:interval], "
        "pab[:steps] or faster[:steps]; faster, slightly different pixels "
        "(benchmarks/RESULTS.md has the speed-up and PSNR per kind).",
        MODEL_COMMANDS,
        metavar="KIND[:VALUE]",
    ),
)

LAYOUT_OPTIONS = (
    Option(
        "tensor_parallel_size",
        ("--tp",),
        "int",
        "Tensor-parallel ranks per replica (must divide the ranks).",
        LAYOUT_COMMANDS,
        default=1,
        minimum=1,
    ),
    Option(
        "cfg_parallel",
        ("--cfg-parallel",),
        "flag",
        "Run the two guidance branches on two ranks.",
        LAYOUT_COMMANDS,
        default=False,
    ),
    Option(
        "vae_parallel",
        ("--vae-parallel",),
        "flag",
        "Split each image's VAE decode into bands of rows over the replica's ranks "
        "(halo rows exchanged: the whole decode's pixels, a fraction of its memory).",
        LAYOUT_COMMANDS,
        default=False,
    ),
    Option(
        "ulysses_degree",
        ("--ulysses",),
        "int",
        "Sequence-parallel ranks per replica splitting an image's tokens, attention heads "
        "exchanged by all-to-all (Ulysses); must divide the heads.",
        LAYOUT_COMMANDS,
        default=1,
        minimum=1,
    ),
    Option(
        "ring_degree",
        ("--ring",),
        "int",
        "Sequence-parallel ranks per replica passing key/value chunks around a ring "
        "(ring attention); composes with --ulysses.",
        LAYOUT_COMMANDS,
        default=1,
        minimum=1,
    ),
)

GENERATE_OPTIONS = (
    Option(
        "prompts_file",
        ("--prompts",),
        "str",
        "The items: .txt (a prompt a line), .jsonl (prompt, optional id/seed/steps/image/"
        "mask_image/strength/...; or an OpenAI batch file), .csv, .parquet, a datasets "
        "directory (save_to_disk) or hf:NAME (a hub dataset).",
        GENERATE,
        target="run",
    ),
    Option(
        "prompt_column",
        ("--prompt-column",),
        "str",
        "parquet/datasets: the column holding the prompt.",
        GENERATE,
        target="run",
        default="prompt",
    ),
    Option(
        "id_column",
        ("--id-column",),
        "str",
        "parquet/datasets: the column holding the item id (default: 'id' if there is one, "
        "else the row).",
        GENERATE,
        target="run",
    ),
    Option(
        "split",
        ("--split",),
        "str",
        "datasets: the split to read (default: train, or the only one).",
        GENERATE,
        target="run",
    ),
    Option(
        "prompts",
        ("--prompt",),
        "str",
        "A prompt (repeat for several).",
        GENERATE,
        target="run",
        multiple=True,
    ),
    Option(
        "output",
        ("--output",),
        "dir",
        "Output directory: images/, manifest.jsonl, run.json, contact_sheet.png.",
        GENERATE,
        target="run",
        required=True,
        short="-o",
    ),
    *(setting_option(setting) for setting in FLAG_SETTINGS),
    Option(
        "images_per_prompt",
        ("--images-per-prompt",),
        "int",
        "Images of each prompt (each with its own seed: the item's, +1, +2, ...).",
        GENERATE,
        target="run",
        default=1,
        minimum=1,
    ),
    Option(
        "image_format",
        ("--image-format",),
        "str",
        "Image files; each carries its prompt, seed and settings (PNG text, EXIF/XMP).",
        GENERATE,
        target="run",
        default="png",
        choices=("png", "jpg", "webp"),
    ),
    Option(
        "quality",
        ("--quality",),
        "int",
        "jpg/webp/mp4 quality (default 90); 100 makes webp videos lossless.",
        GENERATE,
        target="run",
        minimum=1,
        maximum=100,
    ),
    Option(
        "video_format",
        ("--video-format",),
        "str",
        "Video files: mp4 (H.264; needs the video extra, imageio-ffmpeg), webp or gif "
        "(animated, Pillow). Default: mp4 where imageio-ffmpeg is installed, else webp.",
        GENERATE,
        target="run",
        choices=("mp4", "webp", "gif"),
    ),
    Option(
        "output_format",
        ("--output-format",),
        "str",
        "files: OUTPUT/images/<id>.<ext>; webdataset: tar shards OUTPUT/shards/*.tar written "
        "by each replica, listed in OUTPUT/shards.txt.",
        GENERATE,
        target="run",
        default="files",
        choices=("files", "webdataset"),
    ),
    Option(
        "shard_size",
        ("--shard-size",),
        "int",
        "Images per WebDataset shard.",
        GENERATE,
        target="run",
        default=1000,
        minimum=1,
    ),
    Option(
        "batch_invariant",
        ("--batch-invariant",),
        "flag",
        "Run every forward pass one sample at a time: images then do not depend on --batch-size.",
        GENERATE,
        default=False,
    ),
    Option(
        "resume",
        ("--resume",),
        "flag",
        "Skip images a previous run in --output finished (manifest + file).",
        GENERATE,
        target="run",
        default=True,
        off_flag="--no-resume",
    ),
    Option(
        "fail_fast",
        ("--fail-fast",),
        "flag",
        "Stop handing out work after the first failed item.",
        GENERATE,
        target="run",
        default=False,
    ),
    Option(
        "trace_file",
        ("--trace",),
        "file",
        "Write a JSON-lines trace of the engine's events (queued, batch started/finished, done).",
        GENERATE,
        target="command",
    ),
    Option(
        "metrics_port",
        ("--metrics-port",),
        "int",
        "Serve Prometheus metrics on 127.0.0.1:PORT while the job runs.",
        GENERATE,
        target="command",
        minimum=1,
        maximum=65535,
    ),
)

SERVE_OPTIONS = (
    Option(
        "host",
        ("--host",),
        "str",
        "Address to listen on; beyond loopback an API key is required.",
        SERVE,
        target="command",
        default="127.0.0.1",
    ),
    Option(
        "port",
        ("--port",),
        "int",
        "Port to listen on (0: a free one).",
        SERVE,
        target="command",
        default=8000,
        minimum=0,
        maximum=65535,
    ),
    Option(
        "api_key",
        ("--api-key",),
        "str",
        "Bearer token every /v1 request must carry (or $SPMD_DIFFUSION_API_KEY).",
        SERVE,
        target="command",
        envvar="SPMD_DIFFUSION_API_KEY",
    ),
    Option(
        "served_model_name",
        ("--served-model-name",),
        "str",
        "Model name in /v1/models (default: --model).",
        SERVE,
        target="command",
    ),
    Option(
        "batch_wait_ms",
        ("--batch-wait-ms",),
        "float",
        "How long a partial batch waits for same-shape requests to join it.",
        SERVE,
        target="command",
        default=5.0,
        minimum=0,
        maximum=10000,
    ),
    Option(
        "max_queue",
        ("--max-queue",),
        "int",
        "Requests that may wait for a replica; beyond that new ones get 503.",
        SERVE,
        target="command",
        default=4096,
        minimum=1,
    ),
    Option(
        "lora_dir",
        ("--lora-dir",),
        "dir",
        "Adapters requests may name: every weights file or adapter directory in DIR, by its "
        "stem (also --lora NAME=PATH, repeatable; a plain --lora PATH is always on).",
        SERVE,
        target="command",
    ),
    Option(
        "max_loras",
        ("--max-loras",),
        "int",
        "Adapters kept loaded per replica; past it the least recently used is unloaded.",
        SERVE,
        target="command",
        default=4,
        minimum=1,
    ),
    Option(
        "max_video_jobs",
        ("--max-video-jobs",),
        "int",
        "Video jobs queued, running or waiting to be fetched; beyond that new ones get 429.",
        SERVE,
        target="command",
        default=64,
        minimum=1,
    ),
    Option(
        "video_ttl",
        ("--video-ttl",),
        "float",
        "Seconds a finished video job (and its file) is kept.",
        SERVE,
        target="command",
        default=3600.0,
        minimum=1,
    ),
)

WORKER_OPTIONS = (
    Option(
        "listen",
        ("--listen",),
        "str",
        "Address to wait for the executor on.",
        WORKER,
        target="command",
        required=True,
        metavar="HOST:PORT",
    ),
    Option("rank", ("--rank",), "int", "This worker's rank.", WORKER, target="command", default=0),
    Option(
        "world_size",
        ("--world-size",),
        "int",
        "Number of workers.",
        WORKER,
        target="command",
        default=1,
    ),
)

OPTIONS: tuple[Option, ...] = (
    GENERATE_OPTIONS + SERVE_OPTIONS + WORKER_OPTIONS + LAYOUT_OPTIONS + MODEL_OPTIONS
)


def options_of(command: str) -> tuple[Option, ...]:
    """The options ``command`` takes, in the order its ``--help`` lists them."""
    return tuple(option for option in OPTIONS if command in option.commands)
