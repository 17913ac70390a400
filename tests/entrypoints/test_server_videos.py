"""Video jobs over HTTP (``/v1/videos``) with the real ``openai`` client on the tiny Wan
pipeline: create -> in_progress with progress -> completed -> content; delete stops a running
job between steps; jobs are bounded; an image model refuses."""

from __future__ import annotations

import time

import pytest
from gates import HoldForSignal
from serving import KEY, call

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.server import ServerLimits, serve
from spmd_diffusion.jobs.video import default_video_format, read_frames

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai", reason="the test extra installs openai")


@pytest.fixture(scope="module")
def video_server(tiny_video):
    engine = AsyncDiffusionEngine(
        OmniDiffusionConfig(model="tiny-video", executor_class="uni"), max_wait_s=0.0
    )
    http = serve(
        engine,
        "127.0.0.1",
        0,
        api_key=KEY,
        model_name="tiny-video",
        limits=ServerLimits(max_video_jobs=1),
    ).start()
    yield http
    http.shutdown()
    http.server_close()


def client_of(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)


def wait_status(client, video_id: str, wanted: set[str], timeout: float = 300.0, server=None):
    """Until the job's status is one of ``wanted`` (the timeout only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        video = client.videos.retrieve(video_id)
        if video.status in wanted:
            return video
        if time.monotonic() >= deadline:
            engine = server.async_engine if server is not None else None
            state = (
                ""
                if engine is None
                else f" (engine: {engine.running} running, {engine.queued} queued)"
            )
            raise AssertionError(f"still {video.status} at {video.progress}%{state}")
        time.sleep(0.05)


def test_a_video_job_goes_from_queued_to_completed_and_its_file_is_fetched_once(video_server):

    client = client_of(video_server)
    video = client.videos.create(
        prompt="a wave",
        seconds="4",
        size="64x64",
        extra_body={"num_frames": 5, "num_inference_steps": 3, "seed": 2},
    )
    assert (
        video.status in ("queued", "in_progress")
        and video.id.startswith("video_")
        and video.seconds == "4"
    )
    done = wait_status(client, video.id, {"completed", "failed"}, server=video_server)
    assert done.status == "completed" and done.progress == 100, done
    assert done.completed_at >= done.created_at and done.expires_at > done.completed_at
    assert video.id in [item.id for item in client.videos.list().data]
    data = client.videos.download_content(video.id).read()
    frames = read_frames(data, default_video_format())
    assert len(frames) == 5 and frames[0].size == (64, 64)
    with pytest.raises(openai.APIStatusError) as again:
        client.videos.download_content(video.id)
    assert again.value.status_code == 410  # the file went once fetched; the record stays
    assert client.videos.retrieve(video.id).status == "completed"


def test_deleting_a_running_job_stops_it_between_steps_and_frees_its_place(video_server):
    client = client_of(video_server)
    engine = video_server.async_engine
    with HoldForSignal(at_step=2):
        video = client.videos.create(
            prompt="a long wave", extra_body={"num_frames": 5, "num_inference_steps": 50}
        )
        running = wait_status(client, video.id, {"in_progress"})
        deadline = time.monotonic() + 60
        while client.videos.retrieve(video.id).progress == 0:  # the first step report (1 of 50)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert running.status == "in_progress"
        with pytest.raises(
            openai.RateLimitError, match="too_many_jobs|the limit"
        ):  # max_video_jobs=1
            client.videos.create(prompt="another", extra_body={"num_frames": 5})
        assert client.videos.delete(video.id).deleted
        deadline = time.monotonic() + 60
        while engine.running:
            assert time.monotonic() < deadline, "the deleted job kept running"
            time.sleep(0.02)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    status, text = call(video_server.url + "/metrics")
    assert 'spmd_diffusion_requests_total{outcome="cancelled"} 1.0' in text
    after = client.videos.create(
        prompt="after", extra_body={"num_frames": 5, "num_inference_steps": 2}
    )
    assert wait_status(client, after.id, {"completed", "failed"}).status == "completed"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "x", "seconds": "0"}, "seconds: Input should be greater than 0"),
        ({"prompt": "x", "size": "big"}, "size must look like 512x512"),
        (
            {"prompt": "x", "num_frames": 0},
            "num_frames: Input should be greater than or equal to 1",
        ),
        ({"prompt": "x", "quality": "hd"}, "quality: Extra inputs are not permitted"),
        ({}, "prompt: Field required"),
        ({"prompt": "x", "model": "other"}, "does not exist"),
    ],
    ids=["seconds", "size", "frames", "unknown-field", "no-prompt", "model"],
)
def test_bad_video_requests_are_4xx(video_server, body, message):
    status, answer = call(video_server.url + "/v1/videos", body)
    assert 400 <= status < 500 and message in answer["error"]["message"], answer
    status, answer = call(video_server.url + "/v1/videos/video_nope")
    assert status == 404 and answer["error"]["type"] == "not_found_error"


def test_an_image_server_refuses_video_jobs(tiny_unet):
    engine = AsyncDiffusionEngine(OmniDiffusionConfig(executor_class="uni"), max_wait_s=0.0)
    http = serve(engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny-unet").start()
    try:
        with pytest.raises(openai.BadRequestError, match="makes images, not videos"):
            client_of(http).videos.create(prompt="a wave")
    finally:
        http.shutdown()
        http.server_close()
