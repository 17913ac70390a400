"""``--ulysses`` / ``--ring`` / ``--cfg-parallel`` on the DiT families end to end: real 2-rank
jobs under mpiexec and torchrun give the single-rank images (the model-level matrix over every
family and layout is in tests/multirank/family_checks.py), and run.json's "parallel" says
what ran; guidance is recorded as the pipeline used it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from launch import LAUNCH as COMMANDS
from launch import generate_here
from PIL import Image

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

LAUNCH = {name: COMMANDS[name] for name in ("mpiexec", "torchrun")}
PROMPTS = [
    {"id": "cube", "prompt": "a red cube on a table", "negative_prompt": "blurry"},
    {
        "id": "sea",
        "prompt": "a blue sphere over the sea at dusk",
        "negative_prompt": "a dull grey picture",
    },
    {"id": "plain", "prompt": "a green hill"},
]


def pixels(output: Path) -> dict[str, np.ndarray]:
    return {
        path.stem: np.asarray(Image.open(path), dtype=np.int16)
        for path in (output / "images").glob("*.png")
    }


@pytest.mark.parametrize(
    "launcher, model, flags",
    [
        ("mpiexec", "tiny-sd3", ["--ulysses", "2", "--vae-parallel"]),
        ("torchrun", "tiny-qwen-image", ["--ring", "2"]),
    ],
    ids=["mpiexec-sd3-ulysses2-vae-parallel", "torchrun-qwen-image-ring2"],
)
def test_sequence_parallel_job_gives_the_single_rank_images(tmp_path, launcher, model, flags):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(item) + "\n" for item in PROMPTS))
    args = ["--prompts", str(prompts), "--model", model, "--steps", "3", "--batch-size", "2"]
    assert generate_here(*args, "--output", str(tmp_path / "single")) == 0
    done = subprocess.run(
        [*LAUNCH[launcher], "generate", *args, *flags, "--output", str(tmp_path / "sp")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single, parallel = pixels(tmp_path / "single"), pixels(tmp_path / "sp")
    assert sorted(parallel) == ["cube", "plain", "sea"] and sorted(single) == sorted(parallel)
    worst = max(int(np.abs(single[key] - parallel[key]).max()) for key in single)
    assert worst <= 2, f"{worst}/255 off the single-rank images"
    run = json.loads((tmp_path / "sp" / "run.json").read_text())
    sp = run["parallel"]["sp"]
    degree = {
        flag: int(value)
        for flag, value in zip(flags, flags[1:], strict=False)
        if flag in ("--ulysses", "--ring")
    }
    assert (sp["ulysses"], sp["ring"]) == (degree.get("--ulysses", 1), degree.get("--ring", 1))
    if "--vae-parallel" in flags:  # every batch's decode split over the two ranks
        assert (
            run["parallel"]["vae"]["split_decoder_calls"] == 2
            and run["parallel"]["vae"]["whole_decoder_calls"] == 0
        )
        assert "vae parallel" in done.stderr
    assert run["parallel"]["layout"]["sp"] == 2 and run["layout"]["replica_size"] == 2
    assert sp["sequence_parallel_attention_calls"] > 0 and sp["attention_modules"] > 0
    assert (
        "sequence parallel" in done.stderr
        and "attention calls over the whole sequence" in done.stderr
    )


def test_branch_cfg_parallel_job_splits_qwen_image_true_cfg(tmp_path):
    """Qwen-Image calls its transformer once per guidance branch: the pair runs one branch each
    after the first step, and the images are the single rank's."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(item) + "\n" for item in PROMPTS))
    args = [
        "--prompts",
        str(prompts),
        "--model",
        "tiny-qwen-image",
        "--steps",
        "3",
        "--batch-size",
        "1",
    ]
    assert generate_here(*args, "--output", str(tmp_path / "single")) == 0
    done = subprocess.run(
        [
            *LAUNCH["mpiexec"],
            "generate",
            *args,
            "--cfg-parallel",
            "--output",
            str(tmp_path / "cfg"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single, parallel = pixels(tmp_path / "single"), pixels(tmp_path / "cfg")
    assert max(int(np.abs(single[key] - parallel[key]).max()) for key in single) <= 2
    cfg = json.loads((tmp_path / "cfg" / "run.json").read_text())["parallel"]["cfg"]
    # two guided items (first step whole, then paired) and one without a negative prompt (whole)
    assert cfg == {"split_calls": 2 * 2 * 2, "whole_calls": 2 * 2 + 3}, cfg
    lines = {
        line["id"]: line
        for line in map(json.loads, (tmp_path / "cfg" / "manifest.jsonl").read_text().splitlines())
    }
    assert lines["cube"]["true_cfg_scale"] == 4.0 and lines["plain"]["true_cfg_scale"] is None
    assert all(
        line["guidance_scale"] is None for line in lines.values()
    )  # Qwen-Image has no guidance embedding
