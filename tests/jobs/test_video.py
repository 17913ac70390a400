"""Video pipelines: the embedded tiny-video (Wan 2.1 layout), num_frames/fps, video files
(MP4 through imageio-ffmpeg, animated WebP/GIF through Pillow) that carry their record, the
frame strip of the contact sheet, manifest lines per video, and what is refused up front.
(Launchers and TP/CFG: tests/jobs/test_video_cli.py.)"""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.cli import main
from spmd_diffusion.entrypoints.server import GENERATE_PATH, serve
from spmd_diffusion.jobs import video
from spmd_diffusion.jobs.contact_sheet import contact_sheet
from spmd_diffusion.jobs.encoding import Encoding
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.images import decode_image
from spmd_diffusion.worker.diffusion_worker import DiffusionWorker

FRAMES = np.random.RandomState(0).rand(5, 32, 48, 3).astype(np.float32)
RECORD = {"id": "v1", "prompt": 'a "quoted" = ; # \\ prompt\nsecond line', "seed": 7}


@pytest.mark.parametrize("video_format", video.VIDEO_FORMATS)
def test_each_format_decodes_to_its_frames_and_carries_the_record(video_format):
    data = video.encode_video(FRAMES, video_format, fps=8, quality=100, info=RECORD)
    frames = video.read_frames(data, video_format)
    assert len(frames) == 5 and frames[0].size == (48, 32)
    assert video.read_video_record(data, video_format) == RECORD
    assert video.encode_video(FRAMES, video_format, fps=8, quality=100, info=RECORD) == data, (
        "deterministic"
    )
    if video_format == "webp":  # quality 100: lossless
        expected = (np.clip(FRAMES, 0, 1) * 255).round().astype(np.uint8)
        assert all(
            np.array_equal(np.asarray(frame), want)
            for frame, want in zip(frames, expected, strict=True)
        )


@pytest.mark.parametrize("video_format", video.VIDEO_FORMATS)
def test_a_video_holds_its_texts_once(video_format):
    record = dict(
        RECORD, negative_prompt="blur = ; # \\ it\nand more", prompt="zqzqzq " + RECORD["prompt"]
    )
    data = video.encode_video(FRAMES, video_format, fps=8, info=record)
    assert video.read_video_record(data, video_format) == record
    stored = "zqzqzq".encode("utf-16-be") if video_format == "webp" else b"zqzqzq"
    assert data.count(stored) == 1


def test_webp_and_gif_frame_duration_follows_fps():
    for video_format in ("webp", "gif"):
        with Image.open(io.BytesIO(video.encode_video(FRAMES, video_format, fps=10))) as clip:
            clip.seek(1)
            clip.load()  # WebP sets a frame's duration once the frame is decoded
            assert clip.n_frames == 5 and clip.info["duration"] == 100


def test_mp4_without_the_extra_is_refused_with_the_package_to_install(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(video, "mp4_available", lambda: False)
    assert video.default_video_format() == "webp"
    with pytest.raises(ValueError, match=r"imageio-ffmpeg"):
        video.check_video_format("mp4")
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "generate",
                "--model",
                "tiny-video",
                "--prompts",
                str(prompts),
                "--output",
                str(tmp_path / "out"),
                "--video-format",
                "mp4",
            ]
        )
    assert (
        exited.value.code == 2 and "pip install 'spmd-diffusion[video]'" in capsys.readouterr().err
    )


def test_encoding_picks_the_video_format_for_frame_lists():
    encoding = Encoding("jpg", None, "gif")
    assert (
        encoding.extension([Image.new("RGB", (8, 8))]) == "gif"
        and encoding.extension(FRAMES) == "gif"
    )
    assert (
        encoding.extension(Image.new("RGB", (8, 8))) == "jpg"
        and encoding.extension(FRAMES[0]) == "jpg"
    )


def test_the_contact_sheet_tile_of_a_video_is_a_frame_strip(tmp_path):
    stripes = np.zeros((4, 16, 16, 3), dtype=np.float32)
    for k in range(4):
        stripes[k, ..., k % 3] = 1.0  # red, green, blue, red
    (tmp_path / "v.mp4").write_bytes(video.encode_video(stripes, "mp4", quality=100))
    (tmp_path / "v.webp").write_bytes(video.encode_video(stripes, "webp", quality=100))
    sheet = np.asarray(
        contact_sheet([("mp4", tmp_path / "v.mp4"), ("webp", tmp_path / "v.webp")], columns=2)
    )
    for left in (0, 128):  # each tile: 4 frames side by side, 32 px each, centred vertically
        row = sheet[64, left : left + 128]
        colours = [int(np.argmax(row[16 + 32 * k])) for k in range(4)]
        assert colours == [0, 1, 2, 0], colours


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_frames": 0}, "num_frames must be an integer >= 1"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"fps": 0}, r"fps must be a number in \(0, 240\]"),
        ({"fps": "fast"}, "fps"),
        ({"extra": {"num_frames": 3}}, "use the request's own fields"),
    ],
)
def test_bad_video_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionRequest(prompt="x", **fields)


def test_num_frames_splits_batches_and_a_video_round_trips_as_json():
    short, long_ = (
        OmniDiffusionRequest(prompt="a", num_frames=5),
        OmniDiffusionRequest(prompt="a", num_frames=9),
    )
    assert short.batch_key() != long_.batch_key()
    assert (
        short.batch_key() == OmniDiffusionRequest(prompt="b", num_frames=5, fps=8).batch_key()
    )  # fps: files only
    frames = [Image.fromarray((FRAMES[k] * 255).astype(np.uint8)) for k in range(5)]
    output = DiffusionOutput(
        request_ids=["v"], images=[[frames]], errors=[None], seeds=[[1]], metadata=[{}]
    )
    back = DiffusionOutput.from_dict(json.loads(json.dumps(output.to_dict())))
    assert [np.asarray(frame).tolist() for frame in back.images[0][0]] == [
        np.asarray(f).tolist() for f in frames
    ]


def test_num_frames_on_an_image_model_is_refused_before_loading(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x", "num_frames": 9}\n')
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "generate",
                "--model",
                "tiny-unet",
                "--prompts",
                str(prompts),
                "--output",
                str(tmp_path / "out"),
            ]
        )
    err = capsys.readouterr().err
    assert (
        exited.value.code == 2 and "p.jsonl:1: StableDiffusionPipeline takes no num_frames" in err
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def video_worker(tiny_video):

    return DiffusionWorker(OmniDiffusionConfig(model="tiny-video", dtype="float32"))


def test_the_tiny_video_model_makes_videos_of_the_asked_frame_count(video_worker):
    requests = [
        OmniDiffusionRequest(prompt="a wave", seed=1, num_inference_steps=3, request_id="a"),
        OmniDiffusionRequest(
            prompt="a wave",
            seed=1,
            num_inference_steps=3,
            num_frames=5,
            fps=8,
            height=32,
            width=48,
            request_id="b",
        ),
    ]
    output = video_worker.generate(requests)
    assert output.ok, output.errors
    first, second = output.images[0][0], output.images[1][0]
    assert len(first) == 9 and first[0].size == (
        64,
        64,
    )  # the tiny model's defaults: 9 frames of 64x64
    assert len(second) == 5 and second[0].size == (48, 32)
    assert output.metadata[0]["num_frames"] == 9 and output.metadata[0]["fps"] == 16
    assert output.metadata[1]["num_frames"] == 5 and output.metadata[1]["fps"] == 8
    assert type(video_worker.pipeline).__name__ == "WanPipeline"
    rounded = video_worker.generate(
        [
            OmniDiffusionRequest(
                prompt="a wave", seed=1, num_inference_steps=2, num_frames=6, request_id="c"
            )
        ]
    )
    assert (
        len(rounded.images[0][0]) == 5 and rounded.metadata[0]["num_frames"] == 5
    )  # Wan makes 4k + 1
    again = video_worker.generate(requests[:1])
    assert [np.asarray(f).tolist() for f in again.images[0][0]] == [
        np.asarray(f).tolist() for f in first
    ]


@pytest.mark.slow
def test_generate_writes_a_decodable_video_per_item_with_manifest_lines(
    tiny_video, tmp_path, capsys
):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a river", "id": "river"}\n{"prompt": "a tree", "id": "tree", "num_frames": 5, '
        '"fps": 12}\n'
    )
    output = tmp_path / "out"
    args = [
        "generate",
        "--model",
        "tiny-video",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--steps",
        "3",
        "--video-format",
        "mp4",
    ]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 0, capsys.readouterr().err
    lines = {
        line["id"]: line
        for line in map(json.loads, (output / "manifest.jsonl").read_text().splitlines())
    }
    assert (
        lines["river"]["path"] == "images/river.mp4" and lines["tree"]["path"] == "images/tree.mp4"
    )
    assert (lines["river"]["num_frames"], lines["river"]["fps"]) == (9, 16)
    assert (lines["tree"]["num_frames"], lines["tree"]["fps"]) == (5, 12)
    for name, frames in (("river", 9), ("tree", 5)):
        data = (output / lines[name]["path"]).read_bytes()
        assert len(video.read_frames(data, "mp4")) == frames
        assert video.read_video_record(data, "mp4")["prompt"] == lines[name]["prompt"]
    assert Image.open(output / "contact_sheet.png").size == (256, 142)
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "complete"
    with pytest.raises(SystemExit) as exited:  # resume: nothing to do
        main(args)
    assert exited.value.code == 0 and "nothing to do" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # another container is another output: made again
        main([*args[:-1], "webp"])
    assert exited.value.code == 0, capsys.readouterr().err
    assert (output / "images" / "tree.webp").exists()


@pytest.mark.slow
def test_http_native_route_returns_frames_and_the_images_api_refuses_a_video_model(tiny_video):

    engine = AsyncDiffusionEngine(
        OmniDiffusionConfig(model="tiny-video", executor_class="uni"), max_wait_s=0.02
    )
    http = serve(engine, "127.0.0.1", 0, api_key="k", model_name="tiny-video").start()
    base = http.url

    def post(path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            base + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        status, body = post(
            GENERATE_PATH,
            {
                "requests": [
                    {"prompt": "a wave", "seed": 1, "num_inference_steps": 2, "num_frames": 5}
                ]
            },
        )
        assert status == 200, body
        frames = decode_image(body["images"][0][0])
        assert len(frames) == 5 and frames[0].size == (64, 64)
        status, body = post("/v1/images/generations", {"prompt": "a wave"})
        assert status == 400 and "makes videos" in body["error"]["message"]
    finally:
        http.shutdown()
        http.server_close()
        engine.close_sync()


@pytest.mark.slow
def test_webdataset_shards_hold_the_videos(tiny_video, tmp_path, capsys):

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a river", "id": "river", "num_frames": 5}\n')
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "generate",
                "--model",
                "tiny-video",
                "--prompts",
                str(prompts),
                "--output",
                str(output),
                "--steps",
                "2",
                "--video-format",
                "gif",
                "--output-format",
                "webdataset",
            ]
        )
    assert exited.value.code == 0, capsys.readouterr().err
    (shard,) = (output / "shards").glob("*.tar")
    with tarfile.open(shard) as tar:
        assert sorted(tar.getnames()) == ["river.gif", "river.json"]
        clip = tar.extractfile("river.gif").read()
        record = json.loads(tar.extractfile("river.json").read())
    assert len(video.read_frames(clip, "gif")) == 5 and record["num_frames"] == 5
