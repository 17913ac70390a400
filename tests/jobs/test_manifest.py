"""Manifest and crash-safe files: what counts as done, torn lines, atomic writes."""

from __future__ import annotations

import json
import os

from spmd_diffusion.jobs.files import FILE_MODE, AppendLog, write_atomic
from spmd_diffusion.jobs.manifest import (
    MANIFEST_NAME,
    done_images,
    fingerprint,
    image_name,
    read_manifest,
)
from spmd_diffusion.request import OmniDiffusionRequest


def _request(**overrides) -> OmniDiffusionRequest:
    settings = dict(
        prompt="a cat", request_id="a", seed=1, num_inference_steps=4, num_images_per_prompt=2
    )
    settings.update(overrides)
    return OmniDiffusionRequest(**settings)


def _line(request, index, status="ok", model="m"):
    return json.dumps(
        {
            "id": request.request_id,
            "index": index,
            "status": status,
            "fingerprint": fingerprint(request, model),
            "path": f"images/{request.request_id}_{index}.png",
        }
    )


def test_image_names():
    assert image_name("x", 0, 1) == "x.png" and image_name("x", 1, 3) == "x_1.png"


def test_done_needs_ok_line_matching_settings_and_file(tmp_path):
    request = _request()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a_0.png").write_bytes(b"png")
    (tmp_path / "images" / "a_1.png").write_bytes(b"png")
    lines = [_line(request, 0), _line(request, 1, status="error")]
    (tmp_path / MANIFEST_NAME).write_text("\n".join(lines) + "\n")
    assert done_images(tmp_path, [request], "m") == {("a", 0)}
    # a later ok line for image 1 wins over the error
    (tmp_path / MANIFEST_NAME).write_text("\n".join([*lines, _line(request, 1)]) + "\n")
    assert done_images(tmp_path, [request], "m") == {("a", 0), ("a", 1)}
    # other settings, other model, or a missing file: not done
    assert done_images(tmp_path, [_request(seed=2)], "m") == set()
    assert done_images(tmp_path, [request], "other-model") == set()
    (tmp_path / "images" / "a_1.png").unlink()
    assert done_images(tmp_path, [request], "m") == {("a", 0)}


def test_torn_last_line_is_skipped_and_never_glued(tmp_path):
    request = _request()
    path = tmp_path / MANIFEST_NAME
    path.write_text(_line(request, 0) + "\n" + _line(request, 1)[:25])
    assert set(read_manifest(path)) == {("a", 0)}
    log = AppendLog(path)
    log.write(_line(request, 1) + "\n")
    log.close()
    assert set(read_manifest(path)) == {("a", 0), ("a", 1)}


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_resume_redoes_truncated_emptied_and_outside_files(tmp_path):
    request = _request(num_images_per_prompt=1)
    images = tmp_path / "images"
    images.mkdir()

    def entry(path: str, size: int | None) -> str:
        record = {
            "id": "a",
            "index": 0,
            "status": "ok",
            "fingerprint": fingerprint(request, "m"),
            "path": path,
        }
        return json.dumps(record if size is None else {**record, "bytes": size})

    (images / "a.png").write_bytes(b"0123456789")
    (tmp_path / MANIFEST_NAME).write_text(entry("images/a.png", 10) + "\n")
    assert done_images(tmp_path, [request], "m") == {("a", 0)}
    (images / "a.png").write_bytes(b"01234")  # truncated by a crash of the machine
    assert done_images(tmp_path, [request], "m") == set()
    (images / "a.png").write_bytes(b"")
    (tmp_path / MANIFEST_NAME).write_text(
        entry("images/a.png", None) + "\n"
    )  # an older line without a size
    assert done_images(tmp_path, [request], "m") == set()
    (tmp_path.parent / "elsewhere.png").write_bytes(b"x")
    for path in ("../elsewhere.png", str(tmp_path.parent / "elsewhere.png")):
        (tmp_path / MANIFEST_NAME).write_text(entry(path, 1) + "\n")
        assert done_images(tmp_path, [request], "m") == set(), path


def test_run_settings_that_change_pixels_are_in_the_fingerprint(tmp_path):
    request = _request(num_images_per_prompt=1)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"png")
    settings = {
        "dtype": "float32",
        "batch_invariant": False,
        "images_per_batch": 4,
        "model_class_name": None,
    }
    record = {
        "id": "a",
        "index": 0,
        "status": "ok",
        "bytes": 3,
        "path": "images/a.png",
        "fingerprint": fingerprint(request, "m", settings),
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(record) + "\n")
    assert done_images(tmp_path, [request], "m", settings) == {("a", 0)}
    for change in (
        {"dtype": "bfloat16"},
        {"batch_invariant": True},
        {"images_per_batch": 2},
        {"model_class_name": "StableDiffusionPipeline"},
    ):
        assert done_images(tmp_path, [request], "m", {**settings, **change}) == set(), change


def test_written_files_follow_the_umask(tmp_path):

    mask = os.umask(0)
    os.umask(mask)
    write_atomic(tmp_path / "x.bin", b"data")
    assert FILE_MODE == 0o666 & ~mask
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == FILE_MODE
