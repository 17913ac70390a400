"""Rank 0 knows a pipeline's call arguments without importing diffusers once it has seen the
class: a small cache keyed by the installed diffusers' version (start-up of every later job)."""

from __future__ import annotations

import json
import subprocess
import sys

from spmd_diffusion.models import loader


def test_the_arguments_are_cached_by_diffusers_version_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_DIFFUSION_CACHE", str(tmp_path))
    first = loader.call_arguments("x", "StableDiffusionPipeline")
    assert (
        first[0] == "StableDiffusionPipeline"
        and "prompt" in first[1]
        and "callback_on_step_end" in first[1]
    )
    cached = json.loads((tmp_path / loader.SIGNATURES_FILE).read_text())
    assert cached == {f"{loader._diffusers_version()}:StableDiffusionPipeline": sorted(first[1])}
    assert loader.call_arguments("x", "NoSuchPipeline") is None  # remembered as unknown too
    # a fresh process reads them back without importing diffusers
    code = (
        "import sys; from spmd_diffusion.models.loader import call_arguments; "
        "print(sorted(call_arguments('x', 'StableDiffusionPipeline')[1])); "
        "print('diffusers' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "SPMD_DIFFUSION_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    arguments, imported = done.stdout.strip().splitlines()
    assert json.loads(arguments.replace("'", '"')) == sorted(first[1]) and imported == "False"


def test_a_broken_cache_file_is_only_slower(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_DIFFUSION_CACHE", str(tmp_path))
    (tmp_path / loader.SIGNATURES_FILE).write_text("{not json")
    assert "prompt" in loader.call_arguments("x", "StableDiffusionPipeline")[1]
    assert json.loads((tmp_path / loader.SIGNATURES_FILE).read_text())  # rewritten whole
