"""Video jobs: ``POST /v1/videos``, ``GET /v1/videos[/{id}[/content]]``, ``DELETE /v1/videos/{id}``.

A video takes minutes, so it is a job, as OpenAI, vLLM-Omni and SGLang serve it: create
(status ``queued``) -> ``in_progress`` with ``progress`` (percent of denoising steps done, from
the replica's step reports) -> ``completed`` (the file waits at ``/content``) or ``failed``
(``error``). OpenAI's field names (``prompt``, ``model``, ``seconds``, ``size`` "WxH"), as a
multipart form (what the ``openai`` client sends) or JSON; extensions ``num_frames``, ``fps``,
``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``seed``. ``seconds`` becomes
``seconds x fps`` frames unless ``num_frames`` is given (the pipeline may round it: Wan makes
4k+1 frames).

Bounded: at most ``max_video_jobs`` jobs are kept (queued, running, or finished and not yet
fetched or expired: a 429 past that), and a finished job's file is deleted once fetched,
deleted, or ``video_job_ttl_s`` after it finished. ``DELETE`` cancels a job that has not
finished: waiting, it is dropped; running, its replica stops at the next step boundary.
Files live in a private temporary directory (mode 0700) and are MP4 where the video extra is
installed, else animated WebP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from spmd_diffusion.entrypoints.http.errors import ApiError, parse_size
from spmd_diffusion.entrypoints.http.state import (
    ServerLimits,
    Serving,
    ServingState,
    images_request_model,
    require_key,
    serving,
    settings_of,
)
from spmd_diffusion.jobs.video import default_video_format, encode_video
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

VIDEOS_PATH = "/v1/videos"
MEDIA_TYPES = {"mp4": "video/mp4", "webp": "image/webp", "gif": "image/gif"}


class OpenAIVideoRequest(BaseModel):
    """OpenAI's ``videos.create`` fields; the diffusers settings are added as extensions."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = None
    seconds: float | None = Field(None, gt=0, le=600)
    size: str | None = None
    user: str | None = None
    lora: str | list[str] | None = None  # adapters this server offers, NAME[:SCALE]


@dataclass(eq=False)
class VideoJob:
    """One video job and what a client may read of it."""

    id: str
    request: OmniDiffusionRequest
    model: str
    seconds: float
    size: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict[str, str] | None = None
    path: Path | None = None
    video_format: str | None = None
    fetched: bool = False
    task: asyncio.Task | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
            "prompt": self.request.prompt,
            "seconds": f"{self.seconds:g}",
            "size": self.size,
            "error": self.error,
            "remixed_from_video_id": None,
        }

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")


class VideoJobs:
    """The server's video jobs: created, followed to their end, swept when expired."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.jobs: dict[str, VideoJob] = {}
        self.directory: Path | None = None  # created on the first job (mkdtemp: mode 0700)

    def sweep(self) -> None:
        """Forget finished jobs past their expiry, deleting their files."""
        now = time.time()
        for job in [
            job
            for job in self.jobs.values()
            if job.expires_at is not None and job.expires_at <= now
        ]:
            self.forget(job)

    def forget(self, job: VideoJob) -> None:
        self.jobs.pop(job.id, None)
        self.release_file(job)

    @staticmethod
    def release_file(job: VideoJob) -> None:
        """Delete the job's file (fetched, deleted or expired); its record stays until expiry."""
        if job.path is not None:
            job.path.unlink(missing_ok=True)
            job.path = None

    @property
    def held(self) -> int:
        """Jobs that hold a replica's work or a file: what the limit bounds."""
        return sum(1 for job in self.jobs.values() if not job.finished or job.path is not None)

    def get(self, video_id: str) -> VideoJob:
        self.sweep()
        job = self.jobs.get(video_id)
        if job is None:
            raise ApiError(
                404,
                f"no video job {video_id!r} (unknown, deleted or expired)",
                "not_found_error",
                param="video_id",
            )
        return job

    def create(self, job_request: OmniDiffusionRequest, seconds: float, size: str) -> VideoJob:
        self.sweep()
        if self.held >= self.state.limits.max_video_jobs:
            raise ApiError(
                429,
                f"{self.held} video jobs are queued, running or waiting to be fetched (the "
                "limit): fetch or delete finished ones, or retry later",
                code="too_many_jobs",
            )
        job = VideoJob(
            "video_" + secrets.token_hex(12), job_request, self.state.model_name, seconds, size
        )
        self.jobs[job.id] = job
        job.task = asyncio.ensure_future(self.follow(job))
        return job

    async def follow(self, job: VideoJob) -> None:
        """Run the job's request, keeping its status and progress; write its file at the end."""
        try:
            async for event in self.state.engine.generate_events(job.request):
                if event["event"] == "started":
                    job.status = "in_progress"
                elif event["event"] == "step" and event["steps"]:
                    job.status = "in_progress"
                    job.progress = min(99, int(100 * event["step"] / event["steps"]))
                elif event["event"] == "done":
                    output = event["output"]
                    if output.errors and output.errors[0] is not None:
                        self.fail(job, output.errors[0])
                    else:
                        await asyncio.to_thread(self.write, job, output)
                elif event["event"] == "failed":
                    self.fail(job, event.get("error", "the request failed"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the job fails, the server goes on
            logger.warning("video job %s failed: %s", job.id, exc)
            self.fail(job, f"{type(exc).__name__}: {exc}")

    def fail(self, job: VideoJob, message: str) -> None:
        job.status, job.error = "failed", {"code": "generation_failed", "message": message}
        self.finish(job)

    def finish(self, job: VideoJob) -> None:
        job.completed_at = int(time.time())
        job.expires_at = job.completed_at + int(self.state.limits.video_job_ttl_s)

    def write(self, job: VideoJob, output: Any) -> None:
        """Encode the job's video into the private directory (off the event loop)."""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="spmd-diffusion-videos-"))
        video_format = default_video_format()
        metadata = output.metadata[0] if output.metadata else {}
        data = encode_video(
            output.images[0][0], video_format, fps=metadata.get("fps") or job.request.fps or 16
        )
        path = self.directory / f"{job.id}.{video_format}"
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(path)
        job.path, job.video_format = path, video_format
        job.status, job.progress = "completed", 100
        self.finish(job)

    def close(self) -> None:
        """Delete every file (the server is gone: nobody can fetch them)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


async def read_fields(request: Request) -> dict[str, Any]:
    """The body's fields: a multipart form (the ``openai`` client) or a JSON object."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data") or kind.startswith(
        "application/x-www-form-urlencoded"
    ):
        try:
            form = await request.form(max_files=1, max_fields=64)
        except Exception as exc:  # noqa: BLE001 - python-multipart's and starlette's parse errors alike
            raise ApiError(400, f"the body is not a valid form: {exc}") from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                raise ApiError(
                    400,
                    f"{key}: this server's video pipeline takes no input file (text-to-video)",
                    param=key,
                )
            if key in fields:
                raise ApiError(400, f"{key} must be given once", param=key)
            fields[key] = value
        return fields
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not JSON or a form: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


VideoRequest = images_request_model(OpenAIVideoRequest, ServerLimits())
router = APIRouter(dependencies=[Depends(require_key)])


def video_jobs(request: Request) -> VideoJobs:
    """A FastAPI dependency: the video jobs of the server this request reached."""
    return serving(request).video_jobs


Jobs = Annotated[VideoJobs, Depends(video_jobs)]


@router.post(VIDEOS_PATH)
async def create_video(
    request: Request,
    state: Serving,
    jobs: Jobs,
) -> dict[str, Any]:
    body = state.validated(VideoRequest, await read_fields(request))
    if not state.video_model:
        raise ApiError(
            400,
            f"{state.model_name!r} makes images, not videos: use POST /v1/images/generations",
            param="model",
        )
    height, width = parse_size(body.size)
    settings = settings_of(body)
    fps = settings.get("fps") or 16
    if settings.get("num_frames") is None and body.seconds is not None:
        settings["num_frames"] = max(1, round(body.seconds * fps))
    try:
        item = OmniDiffusionRequest(
            prompt=body.prompt,
            height=height,
            width=width,
            lora=state.lora_specs(body.lora),
            **settings,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    state.prepared([item])
    state.check_room(1)
    frames = item.num_frames
    seconds = body.seconds if body.seconds is not None else (frames / fps if frames else 0.0)
    size = body.size or "auto"
    return jobs.create(item, seconds, size).describe()


@router.get(VIDEOS_PATH)
async def list_videos(jobs: Jobs) -> dict[str, Any]:
    jobs.sweep()
    data = sorted(
        (job.describe() for job in jobs.jobs.values()), key=lambda job: -job["created_at"]
    )
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get(VIDEOS_PATH + "/{video_id}")
async def retrieve_video(video_id: str, jobs: Jobs) -> dict[str, Any]:
    return jobs.get(video_id).describe()


@router.get(VIDEOS_PATH + "/{video_id}/content")
async def video_content(video_id: str, jobs: Jobs, variant: str = "video") -> Response:
    job = jobs.get(video_id)
    if variant != "video":
        raise ApiError(
            400, f"variant {variant!r} is not served: only the video itself", param="variant"
        )
    if job.status != "completed":
        raise ApiError(
            409,
            f"video job {video_id} is {job.status}: its content exists once it is completed"
            + (f" ({job.error['message']})" if job.error else ""),
            code="video_not_ready",
        )
    if job.path is None or job.fetched:  # fetched: its file goes once this response is sent
        raise ApiError(
            410, f"video job {video_id}'s file was already fetched", code="video_fetched"
        )
    job.fetched = True
    return FileResponse(
        job.path,
        media_type=MEDIA_TYPES[job.video_format],
        filename=f"{video_id}.{job.video_format}",
        background=BackgroundTask(jobs.release_file, job),
    )


@router.delete(VIDEOS_PATH + "/{video_id}")
async def delete_video(video_id: str, jobs: Jobs) -> dict[str, Any]:
    job = jobs.get(video_id)
    if job.task is not None and not job.task.done():
        job.task.cancel()  # waiting: dropped; running: stopped at the next step boundary
    jobs.forget(job)
    return {"id": video_id, "object": "video.deleted", "deleted": True}
