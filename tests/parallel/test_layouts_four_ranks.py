"""A 4-rank batch job end to end: ``mpiexec -n 4 ... --tp 2`` runs two replicas of two
tensor-parallel ranks, each leader writing its own images, which are the images one rank
makes. (Every 4-rank layout -- tp 2 x dp 2, cfg 2 x dp 2, tp 2 x cfg 2 -- is checked pixel for
pixel at the model level by ``torchrun --nproc-per-node 4`` over tests/multirank in
scripts/test.sh; the 2-rank layouts as jobs: tests/jobs/test_generate_cli.py.) The ranks
oversubscribe the 2-core machine; the tiny DiT keeps the job to seconds of compute."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from launch import BIN, generate_here
from PIL import Image

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

COMMON = [
    "--model",
    "tiny-dit",
    "--steps",
    "3",
    "--height",
    "64",
    "--width",
    "64",
    "--batch-size",
    "1",
]


@pytest.mark.timeout(400)
def test_two_tensor_parallel_replicas_on_four_ranks_make_the_single_rank_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a tiny scene {k}\n" for k in range(4)))
    single, output = tmp_path / "single", tmp_path / "out"
    assert generate_here("--prompts", str(prompts), "--output", str(single), *COMMON) == 0
    command = [
        str(BIN / "mpiexec"),
        "-n",
        "4",
        str(BIN / "omni-diffuse"),
        "generate",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        *COMMON,
        "--tp",
        "2",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=360,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = json.loads((output / "run.json").read_text())
    assert (run["layout"]["replicas"], run["layout"]["replica_size"]) == (2, 2)
    lines = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {line["written_by"] for line in lines} == {
        0,
        2,
    }  # each replica's leader
    for line in lines:
        a = np.asarray(Image.open(output / line["path"]), dtype=np.int16)
        b = np.asarray(Image.open(single / line["path"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, line["id"]  # float noise of ~1e-6 may flip one level
