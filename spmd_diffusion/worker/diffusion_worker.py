"""DiffusionWorker: one per rank; owns a diffusers pipeline and serves the RPC methods.

Every executor, whatever its transport, ends in these methods, so behaviour (batching,
seeding, error isolation, sleep/wake) is identical under ``uni``, ``mp``, MPI and torchrun.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (numpy, torch); project modules load where
# used (jobs.video, models.guidance, models.lora, models.options, models.quantization, parallel,
# parallel.groups, utils.image_inputs, utils.images): they pull in heavy modules or import back into
# this one

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

from spmd_diffusion.data import DEFERRED, DiffusionOutput, OmniDiffusionConfig, OutputsPending
from spmd_diffusion.errors import ConnectionLostError, gloo_brief, peer_lost
from spmd_diffusion.models.loader import model_call_defaults
from spmd_diffusion.request import DEFAULT_FPS, OmniDiffusionRequest
from spmd_diffusion.worker.batching import ImageJob, plan_batches
from spmd_diffusion.worker.device import check_one_gpu_per_rank, resolve_device, resolve_dtype
from spmd_diffusion.worker.model_setup import ModelSetup, set_up_model
from spmd_diffusion.worker.output_writer import CLOSE_TIMEOUT_S, OutputWriter
from spmd_diffusion.worker.step_watch import (
    DEFAULT_INTERVAL_S,
    CallCancelled,
    StepWatch,
    cancelled_error,
    replica_agreement,
)

logger = logging.getLogger(__name__)

SLEEP_LEVELS = (1, 2)
WAKE_TAGS = ("weights",)


class DiffusionWorker:
    """Loads the pipeline on construction; ``generate`` turns requests into images."""

    def __init__(
        self,
        od_config: OmniDiffusionConfig,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        local_world_size: int = 1,
        store: Any | None = None,
        one_node: bool | None = None,
    ) -> None:
        import torch

        self.od_config = od_config
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.device = resolve_device(od_config.device, local_rank)
        self.local_world_size = local_world_size
        threads = od_config.torch_num_threads
        if threads is None and self.device.type == "cpu":
            # CPU float results depend on the intra-op thread count, so it must never depend
            # on the layout: one thread per rank unless the user asks for more.
            threads = 1
        if threads:
            torch.set_num_threads(threads)
        from spmd_diffusion.parallel.groups import join_parallel_groups

        if od_config.replica_size > 1 and self.device.type == "cuda":
            check_one_gpu_per_rank(local_world_size, torch.cuda.device_count())

        # Collective over the job when tp x cfg > 1: every rank builds its worker in step.
        self.parallel = join_parallel_groups(
            od_config,
            rank,
            world_size,
            self.device,
            store,
            one_node=local_world_size == world_size if one_node is None else one_node,
        )
        self.torch_dtype = resolve_dtype(od_config.dtype, self.device)
        self.pipeline: Any = None
        self.sleep_level = 0
        self.load_seconds = 0.0
        self.images_generated = 0
        self.requests_failed = 0
        self._closed = False
        self.call_channel: Any = None  # the serve loop's CallChannel while a call runs
        self._writer: OutputWriter | None = None  # the leader's output writer, started on first use
        self._agreement: list[Any] | None = None  # the replica's stop agreement, built on first use
        self._load()

    # -- loading -------------------------------------------------------------------------
    def _load(self) -> None:
        """Load and set up the model: the ordered steps of :mod:`.model_setup`."""
        start = time.perf_counter()
        config = self.od_config
        setup = set_up_model(ModelSetup(config, self.device, self.torch_dtype, self.parallel))
        self.pipeline, self.adapters = setup.pipeline, setup.adapters
        self.model_report, self.parallel_report = setup.model_report, setup.parallel_report
        self.step_cache = setup.step_cache
        if setup.quantized_components is not None:
            self.quantized_components = setup.quantized_components
        self._call_params = inspect.signature(self.pipeline.__call__).parameters
        self.call_defaults = model_call_defaults(config.model)
        from spmd_diffusion.models.guidance import guidance_of

        self.guidance = guidance_of(
            type(self.pipeline).__name__, dict(getattr(self.denoiser, "config", {}) or {})
        )
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "loaded %s on %s in %.1f s",
            type(self.pipeline).__name__,
            self.device,
            self.load_seconds,
        )

    def memory_report(self) -> dict[str, Any]:
        """This rank's memory: the denoiser's weights as stored (quantized weights at their real
        size, TP shards only), the peak it reached (CUDA: allocated and reserved; CPU: the
        process's peak resident set) and which memory levers are on."""

        import torch

        from spmd_diffusion.models.quantization import storage_bytes

        config = self.od_config
        report: dict[str, Any] = {"rank": self.rank}
        denoiser = self.denoiser if self.pipeline is not None else None
        if denoiser is not None:
            report["denoiser_weight_bytes"] = storage_bytes(denoiser)
        if self.device.type == "cuda":
            report["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            report["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        report["peak_rss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )  # Linux: KiB
        levers = {
            "quantize": config.quantize,
            "offload": config.offload,
            "vae_tiling": config.vae_tiling,
            "vae_slicing": config.vae_slicing,
            "vae_parallel": config.vae_parallel,
            "tensor_parallel": config.tensor_parallel_size
            if config.tensor_parallel_size > 1
            else None,
        }
        report["levers"] = {name: value for name, value in levers.items() if value}
        if config.quantize is not None:
            report["quantized_components"] = getattr(self, "quantized_components", [])
        return report

    @property
    def denoiser(self) -> Any:
        """The network that runs every step: the UNet or the transformer (None for a pipeline
        with neither, such as a custom class)."""
        from spmd_diffusion.models.options import denoiser_of

        try:
            return denoiser_of(self.pipeline)[1]
        except ValueError:
            return None

    # -- generation ------------------------------------------------------------------------
    def _default(self, name: str) -> Any:
        if name in self.call_defaults:
            return self.call_defaults[name]
        param = self._call_params.get(name)
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default

    def _default_size(self) -> tuple[int | None, int | None]:
        """(width, height) when a request sets none: the model's call defaults, else the
        denoiser's sample size in pixels, else None (the pipeline's own)."""
        sample = getattr(getattr(self.denoiser, "config", None), "sample_size", None)
        scale = getattr(self.pipeline, "vae_scale_factor", None)
        side = sample * scale if isinstance(sample, int) and isinstance(scale, int) else None
        return self.call_defaults.get("width", side), self.call_defaults.get("height", side)

    def effective_settings(
        self, request: OmniDiffusionRequest, size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """The settings a request really runs with: its own, else the pipeline's defaults.
        ``size`` is the (width, height) an input image gives the output (see ``_output_size``)."""

        def pick(value: Any, fallback: Any) -> Any:
            return fallback if value is None else value

        default_width, default_height = self._default_size()
        width, height = (
            size
            if size is not None
            else (pick(request.width, default_width), pick(request.height, default_height))
        )
        settings = {
            "num_inference_steps": pick(
                request.num_inference_steps, self._default("num_inference_steps")
            ),
            "guidance_scale": pick(request.guidance_scale, self._default("guidance_scale")),
            "height": height,
            "width": width,
        }
        if (
            self._accepts("true_cfg_scale") or request.true_cfg_scale is not None
        ):  # refused below if not taken
            settings["true_cfg_scale"] = pick(
                request.true_cfg_scale, self._default("true_cfg_scale")
            )
        if request.image is not None:
            settings["strength"] = pick(request.strength, self._default("strength"))
        if self.makes_video:
            settings["num_frames"] = pick(request.num_frames, self._default("num_frames"))
        return settings

    def recorded_settings(
        self, request: OmniDiffusionRequest, size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """The settings an image's record gives: those it ran with, and of the guidance values
        only those the pipeline used (Qwen-Image ignores guidance_scale; true CFG needs a
        negative prompt): None for a value it ignored."""
        settings = self.effective_settings(request, size)
        if self.guidance is not None:
            settings.update(
                self.guidance.used({**settings, "negative_prompt": request.negative_prompt})
            )
        return settings

    @property
    def makes_video(self) -> bool:
        """A video pipeline: it takes ``num_frames`` and returns ``frames``."""
        return self._accepts("num_frames")

    def _made_frames(self, videos: dict[int, Any]) -> dict[str, int]:
        """The frame count a request's videos came out with: a pipeline may round the one asked
        for (Wan makes 4k + 1 frames: 6 asked give 5), and the manifest must say what was made."""
        if not self.makes_video or not videos:
            return {}
        return {"num_frames": len(next(iter(videos.values())))}

    def _loras(self, request: OmniDiffusionRequest) -> list[Any]:
        """The adapters a request runs with: its own set, else the run's."""
        from spmd_diffusion.models.lora import parse_loras

        return parse_loras(request.lora if request.lora is not None else self.od_config.lora)

    def model_facts(self, request: OmniDiffusionRequest) -> dict[str, Any]:
        """What besides the call's arguments made the image: the scheduler class and the
        active LoRA adapters (for the manifest). A pipeline without a scheduler (a custom
        class, the benchmarks' stand-in) has None."""
        scheduler = getattr(self.pipeline, "scheduler", None)
        facts: dict[str, Any] = {
            "scheduler": None if scheduler is None else type(scheduler).__name__
        }
        if self.od_config.cache is not None:
            facts["cache"] = self.od_config.cache
        if self.od_config.quantize is not None:
            facts["quantize"] = self.od_config.quantize
        if self.makes_video:
            facts["fps"] = request.fps or DEFAULT_FPS  # the file's rate, not a call argument
        loras = self._loras(request)
        if loras:
            facts["lora"] = [{"source": spec.source, "scale": spec.scale} for spec in loras]
        return facts

    def _output_size(self, request: OmniDiffusionRequest) -> tuple[int, int] | None:
        """(width, height) of a request with an input image: the request's size where it sets
        one (the input is resized to it), else the input image's size rounded down as diffusers
        rounds it -- for inpainting too, whose pipeline would otherwise make the model's default
        size from a differently sized input. Reads the image's header only."""
        if request.image is None:
            return None
        processor = getattr(self.pipeline, "image_processor", None)
        if processor is None or not self._accepts("image"):
            if self._accepts("height") and self._accepts("width"):
                default_width, default_height = self._default_size()
                return (request.width or default_width, request.height or default_height)
            return None  # the pipeline call refuses the image with its own message
        from spmd_diffusion.utils.image_inputs import image_size

        width, height = image_size("image", request.image)
        height, width = processor.get_default_height_width(
            None, request.height or height, request.width or width
        )
        if min(width, height) < 8:
            raise ValueError(
                f"the input image is {width}x{height} after rounding: too small for the VAE"
            )
        return (width, height)

    def _accepts(self, name: str) -> bool:
        # Named parameters only: pipelines swallow unknown **kwargs silently.
        param = self._call_params.get(name)
        return param is not None and param.kind is not inspect.Parameter.VAR_KEYWORD

    def _input_images(
        self,
        requests: list[OmniDiffusionRequest],
        jobs: list[ImageJob],
        size: tuple[int, int] | None,
    ) -> dict[str, Any]:
        """``image`` / ``mask_image`` for one pipeline call: decoded here, for this batch only.
        A pipeline that takes no height/width gets its input already at the output size."""
        from spmd_diffusion.utils.image_inputs import load_image_input

        first = requests[jobs[0].request_pos]
        resize = size is not None and not self._accepts("height")
        inputs: dict[str, Any] = {}
        for name, mode in (("image", "RGB"), ("mask_image", "L")):
            if getattr(first, name) is None:
                continue
            decoded: dict[int, Any] = {}
            for job in jobs:
                if job.request_pos not in decoded:
                    image = load_image_input(getattr(requests[job.request_pos], name), mode)
                    if resize and image.size != size:
                        image = self.pipeline.image_processor.resize(image, size[1], size[0])
                    decoded[job.request_pos] = image
            inputs[name] = [decoded[job.request_pos] for job in jobs]
        return inputs

    def _pipeline_kwargs(
        self,
        requests: list[OmniDiffusionRequest],
        jobs: list[ImageJob],
        step_callback: Callable[[int], None] | None = None,
        size: tuple[int, int] | None = None,
        after_step: Callable[[int, int | None], None] | None = None,
    ) -> dict[str, Any]:
        import torch

        first = requests[jobs[0].request_pos]
        settings = self.effective_settings(first, size)
        settings.pop("strength", None)  # passed below only when the request sets it
        for name in ("height", "width"):
            if not self._accepts(name) and (
                first.image is not None or getattr(first, name) is None
            ):
                # The pipeline sizes its output from the input image (resized to the size
                # asked for), or has a size of its own: height/width are not its arguments.
                settings.pop(name)
        kwargs: dict[str, Any] = {
            key: value for key, value in settings.items() if value is not None
        }
        kwargs.update(self._input_images(requests, jobs, size))
        if first.strength is not None:
            kwargs["strength"] = first.strength
        kwargs["prompt"] = [requests[job.request_pos].prompt for job in jobs]
        negatives = [requests[job.request_pos].negative_prompt for job in jobs]
        if any(negatives):
            kwargs["negative_prompt"] = [negative or "" for negative in negatives]
        # One output per prompt entry (the batch lists a prompt once per image it wants).
        count = (
            "num_videos_per_prompt"
            if self._accepts("num_videos_per_prompt")
            else "num_images_per_prompt"
        )
        kwargs[count] = 1
        # A CPU generator per image: reproducible across devices and batch positions.
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        if "use_resolution_binning" in self._call_params:
            kwargs["use_resolution_binning"] = False  # honour the requested size exactly
        if "clean_caption" in self._call_params:
            kwargs["clean_caption"] = False  # needs optional packages; prompts are used as given
        if (
            step_callback is not None or after_step is not None
        ) and "callback_on_step_end" in self._call_params:

            def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
                if step_callback is not None:
                    step_callback(step)
                if after_step is not None:  # may end the call (a cancellation)
                    after_step(step, getattr(pipeline, "_num_timesteps", None))
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step_end
        for name, value in self.call_defaults.items():  # e.g. a tiny model's short prompt length
            if name not in kwargs and name not in first.extra and self._accepts(name):
                kwargs[name] = value
        kwargs.update(first.extra)
        refused = sorted(name for name in kwargs if not self._accepts(name))
        if refused:
            raise ValueError(f"{type(self.pipeline).__name__} does not accept {', '.join(refused)}")
        return kwargs

    def _run_batch(
        self,
        requests: list[OmniDiffusionRequest],
        jobs: list[ImageJob],
        step_callback: Callable[[int], None] | None = None,
        size: tuple[int, int] | None = None,
        after_step: Callable[[int, int | None], None] | None = None,
    ) -> list[Any]:
        import numpy as np
        import torch

        from spmd_diffusion.utils.images import as_frames

        self.adapters.activate(
            self._loras(requests[jobs[0].request_pos])
        )  # one set per batch (batch_key)
        kwargs = self._pipeline_kwargs(requests, jobs, step_callback, size, after_step)
        cached = self.step_cache.call() if self.step_cache is not None else contextlib.nullcontext()
        if self.parallel_report is not None and self.parallel_report.cfg is not None:
            self.parallel_report.cfg.reset()  # branch pairing is learned per call: new prompts
        with torch.inference_mode(), cached:
            result = self.pipeline(**kwargs)
        if hasattr(result, "frames"):  # a video pipeline: one list of frames per prompt entry
            images = [as_frames(video) for video in result.frames]
        else:
            images = result.images if hasattr(result, "images") else result[0]
        if isinstance(images, np.ndarray) or isinstance(images, torch.Tensor):
            images = [images[i] for i in range(images.shape[0])]
        if len(images) != len(jobs):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(jobs)} prompts")
        return list(images)

    def _step_watch(self, progress: dict[str, Any] | None) -> StepWatch | None:
        """The step notes and cancellation of one generate call, when the engine asks."""
        if progress is None:
            return None
        if self._agreement is None and self.parallel is not None:
            self._agreement = [replica_agreement(self.parallel.mesh)]
        agree = self._agreement[0] if self._agreement else None
        return StepWatch(
            self.call_channel,
            float(progress.get("interval_s", DEFAULT_INTERVAL_S)),
            self.is_replica_leader,
            agree,
        )

    def _steps_of(self, requests: list[OmniDiffusionRequest], jobs: list[ImageJob]) -> int | None:
        steps = self.effective_settings(requests[jobs[0].request_pos])["num_inference_steps"]
        return steps if isinstance(steps, int) else None

    @staticmethod
    def _step_timer(
        step_seconds: list[float], step_callback: Callable[[int], None] | None
    ) -> Callable[[int], None]:
        """A step callback that appends each step's duration (and calls ``step_callback``)."""
        last = [time.perf_counter()]

        def on_step(step: int) -> None:
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now
            if step_callback is not None:
                step_callback(step)

        return on_step

    def _check_awake(self) -> None:
        if self._closed:
            raise RuntimeError(f"worker rank {self.rank} is shut down")
        if self.sleep_level:
            raise RuntimeError(
                f"worker rank {self.rank} is asleep (level {self.sleep_level}); call wake_up first"
            )

    @property
    def is_replica_leader(self) -> bool:
        """The first rank of its replica: the one that reports (and writes) the images."""
        return self.parallel is None or self.parallel.layout.is_replica_leader(self.rank)

    def generate(
        self,
        requests: list[OmniDiffusionRequest],
        step_callback: Callable[[int], None] | None = None,
        sink: Any | None = None,
        progress: dict[str, Any] | None = None,
    ) -> DiffusionOutput:
        """Images for every request; a request that fails gets its error, the others their images.

        Every request must carry its seed: seeds are fixed by the engine, never by a rank.
        ``step_callback(step)`` runs after every denoising step (where the pipeline supports
        ``callback_on_step_end``); the steps' durations come back in ``timings["step_s"]``
        for the engine's monitoring hooks (diffusers has no callback before the first step, so
        a pipeline call's first duration includes its prompt encoding). ``sink`` (a batch job's
        output writer) makes the replica leader write the images itself and return small records
        in their place, so pixels never travel to rank 0. ``progress`` (``{"interval_s": s}``,
        the server's) makes the replica leader send step notes while the batch runs and stop a
        pipeline call whose requests were all cancelled (see
        :mod:`spmd_diffusion.worker.step_watch`).
        """
        self._check_awake()
        start = time.perf_counter()
        unseeded = [request.request_id for request in requests if request.seed is None]
        if unseeded:
            raise ValueError(
                f"request(s) {', '.join(unseeded)} have no seed: "
                "the engine fixes seeds before dispatch"
            )
        images: list[dict[int, Any]] = [{} for _ in requests]
        errors: list[str | None] = [None] * len(requests)
        seconds = [0.0] * len(requests)
        pipeline_seconds = 0.0
        sizes: list[Any] = [None] * len(requests)
        for pos, request in enumerate(requests):
            try:
                sizes[pos] = self._output_size(request)
            except Exception as exc:  # noqa: BLE001 - e.g. an input file gone since the plan
                errors[pos] = f"{type(exc).__name__}: {exc}"
                sizes[pos] = False
        # Images of different output sizes never share a pipeline call (it would resize them
        # all to the first one's size): each image stays what it would be alone.
        pending = plan_batches(requests, self.od_config.max_images_per_batch, keys=sizes)
        step_seconds: list[float] = []
        watch = self._step_watch(progress)
        while pending:
            jobs = pending.pop(0)
            batch_start = time.perf_counter()
            ids = tuple(dict.fromkeys(requests[job.request_pos].request_id for job in jobs))
            try:
                if watch is not None and watch.all_cancelled(ids):
                    raise CallCancelled(", ".join(ids))
                produced = self._run_batch(
                    requests,
                    jobs,
                    self._step_timer(step_seconds, step_callback),
                    sizes[jobs[0].request_pos],
                    None if watch is None else watch.watch(ids, self._steps_of(requests, jobs)),
                )
            except CallCancelled:
                for pos in sorted({job.request_pos for job in jobs}):
                    errors[pos] = cancelled_error(requests[pos].request_id)
                pipeline_seconds += time.perf_counter() - batch_start
                continue
            except Exception as exc:  # noqa: BLE001 - isolate the failing request
                if peer_lost(
                    exc
                ):  # a rank of this replica died: the job ends, the item is not at fault
                    raise ConnectionLostError(gloo_brief(exc)) from exc
                positions = sorted({job.request_pos for job in jobs})
                if len(positions) > 1:
                    # Rerun each request alone, so one bad request does not sink the rest.
                    pending[:0] = [
                        [job for job in jobs if job.request_pos == pos] for pos in positions
                    ]
                    continue
                errors[positions[0]] = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "request %s failed: %s", requests[positions[0]].request_id, errors[positions[0]]
                )
                continue
            elapsed = time.perf_counter() - batch_start
            pipeline_seconds += elapsed
            for job, image in zip(jobs, produced, strict=True):
                images[job.request_pos][job.index] = image
                seconds[job.request_pos] += elapsed / len(jobs)
        output = DiffusionOutput(
            request_ids=[request.request_id for request in requests],
            images=[
                [] if errors[i] else [per_request[k] for k in sorted(per_request)]
                for i, per_request in enumerate(images)
            ],
            errors=errors,
            seeds=[request.image_seeds() for request in requests],
            metadata=[
                {
                    **self.recorded_settings(request, sizes[i] or None),
                    **self.model_facts(request),
                    **self._made_frames(images[i]),
                    "seconds": round(seconds[i], 6),
                    "rank": self.rank,
                }
                for i, request in enumerate(requests)
            ],
            timings={
                "total_s": time.perf_counter() - start,
                "pipeline_s": pipeline_seconds,
                "step_s": [round(seconds, 6) for seconds in step_seconds],
            },
            rank=self.rank,
        )
        self.images_generated += sum(len(per_request) for per_request in output.images)
        self.requests_failed += sum(error is not None for error in errors)
        if sink is not None and self.is_replica_leader:
            if self.call_channel is None:  # no channel to answer later on (a direct call, Ray)
                return sink.write(output)
            if self._writer is None:
                self._writer = OutputWriter()
            self._writer.submit(sink, output, self.call_channel.answer_later())
            self.call_channel.note(OutputsPending())  # the replica may take its next batch now
            return DEFERRED
        return output

    def warm_up(self, requests: list[OmniDiffusionRequest]) -> float | None:
        """One pipeline call whose images are dropped, so the first call's one-off costs (kernel
        selection, autotuning, allocator growth, lazy initialisation) are paid before the timed
        work. Every rank of a replica runs it together, as a batch. The config's ``warmup``
        None means: where this rank's device is a GPU. Returns its seconds, None if skipped."""
        wanted = self.od_config.warmup
        if wanted is False or (wanted is None and self.device.type != "cuda"):
            return None
        start = time.perf_counter()
        generated, failed = self.images_generated, self.requests_failed
        self.generate(requests)
        self.images_generated, self.requests_failed = generated, failed  # not the job's work
        return time.perf_counter() - start

    def finish_outputs(self) -> None:
        """Wait until the output writer has written and answered every batch it holds."""
        if self._writer is not None:
            self._writer.drain(CLOSE_TIMEOUT_S)

    # -- power management -------------------------------------------------------------------
    def sleep(self, level: int = 1) -> dict[str, Any]:
        """Level 1: weights to host memory. Level 2: weights dropped (reloaded on wake_up)."""
        import torch

        if level not in SLEEP_LEVELS:
            raise ValueError(f"sleep level must be one of {SLEEP_LEVELS}, got {level!r}")
        if self._closed:
            raise RuntimeError(f"worker rank {self.rank} is shut down")
        if level == 1 and self.parallel is not None:
            raise ValueError(
                "sleep level 1 is not supported with tensor/CFG parallelism (sharded "
                "weights are bound to their device); use level 2"
            )
        if level == 1 and self.sleep_level == 0:
            self.pipeline.to("cpu")
        elif level == 2 and self.sleep_level < 2:
            self._release_pipeline()
        self.sleep_level = max(self.sleep_level, level)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"rank": self.rank, "sleep_level": self.sleep_level}

    def wake_up(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Bring back what ``tags`` names (default: everything, i.e. the weights)."""
        unknown = sorted(set(tags or ()) - set(WAKE_TAGS))
        if unknown:
            raise ValueError(f"unknown wake_up tag(s) {unknown}; valid: {list(WAKE_TAGS)}")
        if tags is None or "weights" in tags:
            if self.sleep_level == 1:
                self.pipeline.to(self.device)
            elif self.sleep_level == 2:
                self._load()
            self.sleep_level = 0
        return {"rank": self.rank, "sleep_level": self.sleep_level}

    # -- introspection ------------------------------------------------------------------------
    def get_cache_stats(self) -> dict[str, Any]:
        """Counters and memory of this rank (what is loaded where, what it produced)."""
        import torch

        from spmd_diffusion.parallel import param_bytes

        params = 0
        if self.pipeline is not None:
            for component in self.pipeline.components.values():
                if isinstance(component, torch.nn.Module):
                    params += param_bytes(component)  # local shards only under TP
        stats: dict[str, Any] = {
            "rank": self.rank,
            "device": str(self.device),
            "dtype": str(self.torch_dtype).replace("torch.", ""),
            "sleep_level": self.sleep_level,
            "parameter_bytes": params,
            "load_seconds": round(self.load_seconds, 3),
            "images_generated": self.images_generated,
            "requests_failed": self.requests_failed,
            "lora_adapters_loaded": len(self.adapters.loaded)
            if getattr(self, "adapters", None)
            else 0,
            "lora_evictions": self.adapters.evictions if getattr(self, "adapters", None) else 0,
            **getattr(self, "model_report", {}),
        }
        if getattr(self, "parallel_report", None) is not None:
            stats["parallel"] = self.parallel_report.describe()
        stats["memory"] = self.memory_report()
        if self.od_config.compile:
            from spmd_diffusion.models.options import compile_seconds

            stats["compile_seconds"] = round(compile_seconds(), 3)
        if self.device.type == "cuda":
            stats["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return stats

    def ping(self) -> int:
        """Does nothing but answer: the round trip of an RPC, for latency checks."""
        return self.rank

    def check_health(self) -> dict[str, Any]:
        """Raises when the worker cannot serve; otherwise says what state it is in."""
        if self._closed:
            raise RuntimeError(f"worker rank {self.rank} is shut down")
        if self.pipeline is None and self.sleep_level != 2:
            raise RuntimeError(f"worker rank {self.rank} has no pipeline loaded")
        return {
            "rank": self.rank,
            "status": "asleep" if self.sleep_level else "ok",
            "device": str(self.device),
        }

    def shutdown(self) -> None:
        """Finish writing, then release the pipeline; calling it again does nothing."""
        if self._closed:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True
        self._release_pipeline()

    def _release_pipeline(self) -> None:
        """Drop every reference this worker holds to the pipeline and its modules -- the
        adapters, the step cache's hooks, the CFG wrapper and the parallel report that name the
        denoiser -- so the weights are freed (a process that builds and shuts down engines
        would otherwise keep one model per engine)."""
        self.pipeline = None
        self.adapters = self.step_cache = self.parallel_report = None
        self._call_params = {}
        gc.collect()
