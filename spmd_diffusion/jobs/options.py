"""The settings of one generate run, as the CLI and the config file give them (item files may
override the per-item ones)."""

from __future__ import annotations

from dataclasses import dataclass

from spmd_diffusion.jobs.encoding import Encoding
from spmd_diffusion.jobs.sources import Columns
from spmd_diffusion.jobs.video import default_video_format


@dataclass
class GenerateOptions:
    """The generation settings of one run (item files may override the per-item ones)."""

    output: str
    prompts_file: str | None = None
    prompts: tuple[str, ...] = ()
    steps: int | None = None
    guidance: float | None = None
    true_cfg_scale: float | None = None  # Qwen-Image, Flux: true CFG with a negative prompt
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    strength: float | None = None
    images_per_prompt: int = 1
    batch_size: int = 4  # prompts per batch (a batch size always counts prompts)
    resume: bool = True
    fail_fast: bool = False
    image_format: str = "png"  # png, jpg, webp
    quality: int | None = None  # jpg/webp (default: encoding.DEFAULT_QUALITY)
    video_format: str | None = (
        None  # mp4, webp, gif (None: mp4 where imageio-ffmpeg is installed, else webp)
    )
    num_frames: int | None = None  # video pipelines
    fps: float | None = None  # video files (default request.DEFAULT_FPS)
    output_format: str = "files"  # files, webdataset
    shard_size: int = 1000  # images per WebDataset shard
    prompt_column: str = "prompt"
    id_column: str | None = None
    split: str | None = None

    @property
    def images_per_batch(self) -> int:
        """A batch is the unit a replica takes and one pipeline call: ``batch_size`` prompts of
        ``images_per_prompt`` images each (``OmniDiffusionConfig.max_images_per_batch``)."""
        return self.batch_size * self.images_per_prompt

    @property
    def encoding(self) -> Encoding:
        return Encoding(
            self.image_format, self.quality, self.video_format or default_video_format()
        )

    @property
    def columns(self) -> Columns:
        return Columns(self.prompt_column, self.id_column, self.split)
