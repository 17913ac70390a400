"""``omni-diffuse generate --model tiny-video`` under real launchers: data parallel under
mpiexec -n 2 gives the bytes of the no-launcher run, torchrun writes decodable MP4s of the
asked frame counts, and tensor / CFG parallel give the no-launcher frames (lossless WebP, so
frames compare pixel for pixel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from launch import generate, generate_here, manifest

from spmd_diffusion.jobs.video import read_frames

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

LOSSLESS = ["--video-format", "webp", "--quality", "100"]
FRAME_COUNTS = {"wave": 9, "leaf": 5, "cloud": 9}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tiny_video) -> Path:
    path = tmp_path_factory.mktemp("video-prompts") / "prompts.jsonl"
    lines = [
        {"prompt": "a wave", "id": "wave"},
        {"prompt": "a falling leaf", "id": "leaf", "num_frames": 5},
        {"prompt": "a cloud", "id": "cloud", "fps": 8},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run(launcher: str, prompts: Path, output: Path, *args: str) -> Path:
    done = generate(
        launcher,
        "--model",
        "tiny-video",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--steps",
        "3",
        "--batch-size",
        "2",
        *args,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return output


def frames(output: Path, video_format: str) -> dict[str, list[np.ndarray]]:
    return {
        line["id"]: [
            np.asarray(frame, dtype=np.int16)
            for frame in read_frames((output / line["path"]).read_bytes(), video_format)
        ]
        for line in manifest(output)
    }


@pytest.fixture(scope="module")
def single(prompts, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("video-none")
    assert (
        generate_here(
            "--model",
            "tiny-video",
            "--prompts",
            str(prompts),
            "--output",
            str(output),
            "--steps",
            "3",
            "--batch-size",
            "2",
            *LOSSLESS,
        )
        == 0
    )
    return output


@pytest.mark.timeout(300)
def test_data_parallel_under_mpiexec_gives_the_same_bytes(prompts, single, tmp_path):
    output = run("mpiexec", prompts, tmp_path / "out", *LOSSLESS)
    lines = {line["id"]: line for line in manifest(output)}
    assert {line["written_by"] for line in lines.values()} == {0, 1}, "both replicas wrote videos"
    for item, line in lines.items():
        assert (output / line["path"]).read_bytes() == (single / line["path"]).read_bytes(), item
        assert line["num_frames"] == FRAME_COUNTS[item]
    assert lines["cloud"]["fps"] == 8 and lines["wave"]["fps"] == 16


@pytest.mark.timeout(300)
def test_torchrun_writes_decodable_mp4s_of_the_asked_frame_counts(prompts, single, tmp_path):
    output = run("torchrun", prompts, tmp_path / "out", "--video-format", "mp4")
    decoded = frames(output, "mp4")
    assert {item: len(clip) for item, clip in decoded.items()} == FRAME_COUNTS
    reference = frames(single, "webp")
    for item, clip in decoded.items():  # H.264 is lossy: close to the lossless frames, not equal
        assert (
            np.mean([np.abs(a - b).mean() for a, b in zip(clip, reference[item], strict=True)]) < 8
        ), item
    assert (output / "contact_sheet.png").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "launcher, layout", [("mpiexec", ["--tp", "2"]), ("torchrun", ["--cfg-parallel"])]
)
def test_tensor_and_cfg_parallel_give_the_single_rank_frames(
    prompts, single, tmp_path, launcher, layout
):
    output = run(launcher, prompts, tmp_path / "out", *LOSSLESS, *layout)
    got, want = frames(output, "webp"), frames(single, "webp")
    assert {item: len(clip) for item, clip in got.items()} == FRAME_COUNTS
    worst = max(
        int(np.abs(a - b).max())
        for item in want
        for a, b in zip(got[item], want[item], strict=True)
    )
    assert worst <= 2, f"largest pixel difference {worst}/255"  # float reductions in another order
