"""Manifest and crash-safe files: what counts as done, torn lines, atomic writes."""

from __future__ import annotations

import json

from spmd_diffusion.jobs.files import AppendLog, write_atomic
from spmd_diffusion.jobs.manifest import MANIFEST_NAME, done_images, fingerprint, image_name, read_manifest
from spmd_diffusion.request import OmniDiffusionRequest


def _request(**overrides) -> OmniDiffusionRequest:
    settings = dict(prompt="a cat", request_id="a", seed=1, num_inference_steps=4, num_images_per_prompt=2)
    settings.update(overrides)
    return OmniDiffusionRequest(**settings)


def _line(request, index, status="ok", model="m"):
    return json.dumps({"id": request.request_id, "index": index, "status": status,
                       "fingerprint": fingerprint(request, model), "path": f"images/{request.request_id}_{index}.png"})


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
