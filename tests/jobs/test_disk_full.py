"""A full disk mid-job: each image that cannot be written fails with its file and directory
named, the job goes on (exit 3) with run.json written in place, and a rerun with space again
resumes to complete (a real full filesystem: a small tmpfs, where the test may mount one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from launch import BIN

pytestmark = [pytest.mark.launcher, pytest.mark.slow]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_fails_the_images_that_did_not_fit_naming_them_and_resumes(
    tmp_path, small_disk
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(40)))
    output = small_disk / "out"
    args = [
        str(BIN / "mpiexec"),
        "-n",
        "2",
        str(BIN / "omni-diffuse"),
        "generate",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        "--steps",
        "1",
        "--height",
        "128",
        "--width",
        "128",
        "--batch-size",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert full.returncode == 3, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "items_failed" and run["totals"]["images_failed"] > 0
    failed = [
        json.loads(line)
        for line in (output / "manifest.jsonl").read_text().splitlines()
        if json.loads(line)["status"] != "ok"
    ]
    assert failed and all(
        f"cannot write {output}/images/" in line["error"]
        and f"(in {output}/images)" in line["error"]
        and "No space left on device" in line["error"]
        for line in failed
    )
    # space again: the same command makes what is missing
    moved = tmp_path / "moved"
    shutil.copytree(output, moved)
    subprocess.run(["umount", "-l", str(small_disk)], check=True)
    shutil.copytree(moved, output)
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    totals = json.loads((output / "run.json").read_text())["totals"]
    assert totals["images_ok"] + totals["images_skipped_as_done"] == 40 and totals[
        "images_ok"
    ] == len(failed)
