"""``omni-diffuse generate`` for real: under mpiexec -n 2, torchrun --nproc-per-node 2 and no
launcher, on the tiny models; resume after a kill; a failing item; every bad-input case."""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL, diffusers, numpy, torch)

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from gates import JobGate
from launch import COMMON, LAUNCH, generate, images, manifest

from spmd_diffusion.models import ensure_tiny_model, load_pipeline

pytestmark = [pytest.mark.launcher, pytest.mark.slow]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"prompt": f"a picture of thing {i}", "style": "test"} for i in range(5)]
    lines[2]["steps"] = 2  # a different cost: its own batch
    lines.append({"prompt": "a named item", "id": "named", "seed": 1234})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def runs(prompt_file, tmp_path_factory) -> dict[str, Path]:
    """The same job under every launcher."""
    outputs = {}
    for launcher in LAUNCH:
        output = tmp_path_factory.mktemp(f"out-{launcher}")
        done = generate(
            launcher,
            "--prompts",
            str(prompt_file),
            "--output",
            str(output),
            "--batch-size",
            "2",
            "--model",
            "tiny-unet",
            *COMMON,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        outputs[launcher] = output
    return outputs


def test_outputs_and_manifest(runs):
    output = runs["mpiexec"]
    lines = manifest(output)
    assert sorted(line["id"] for line in lines) == [
        "000001",
        "000002",
        "000003",
        "000004",
        "000005",
        "named",
    ]
    assert all(line["status"] == "ok" and (output / line["path"]).is_file() for line in lines)
    named = next(line for line in lines if line["id"] == "named")
    assert named["seed"] == 1234 and named["num_inference_steps"] == 4 and named["height"] == 64
    assert next(line for line in lines if line["id"] == "000003")["num_inference_steps"] == 2
    assert {line["meta"].get("style") for line in lines if line["id"] != "named"} == {"test"}
    assert {line["rank"] for line in lines} == {0, 1}, "both data-parallel replicas did work"
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "complete" and run["totals"]["images_ok"] == 6
    assert run["layout"]["world_size"] == 2 and run["layout"]["replicas"] == 2
    assert (output / "contact_sheet.png").stat().st_size > 0
    timing = run[
        "timing"
    ]  # where the time went: before the generate phase, the warm-up batch, after it
    assert timing["startup_s"] > timing["load_s"] > 0
    assert 0 < timing["first_output_s"] <= run["seconds"] and timing["steady_images_per_second"] > 0


def test_a_finished_job_has_nothing_to_do_and_loads_nothing(runs, prompt_file):
    again = generate(
        "mpiexec",
        "--prompts",
        str(prompt_file),
        "--output",
        str(runs["mpiexec"]),
        "--batch-size",
        "2",
        "--model",
        "tiny-unet",
        *COMMON,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("nothing to do: all 6 image(s)") == 1
    assert "loaded" not in again.stderr


@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_each_replica_leader_wrote_the_images_it_computed(runs, launcher):

    output = runs[launcher]
    lines = manifest(output)
    assert all(line["written_by"] == line["rank"] for line in lines)
    assert {line["written_by"] for line in lines} == {0, 1}, "both replicas wrote their own images"
    for line in lines:
        assert hashlib.sha256((output / line["path"]).read_bytes()).hexdigest() == line["sha256"]


def test_same_png_bytes_under_every_launcher(runs):
    reference = images(runs["none"])
    assert len(reference) == 6
    for launcher in ("mpiexec", "torchrun"):
        assert images(runs[launcher]) == reference, launcher


def test_resume_after_a_kill_finishes_only_what_is_missing(tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    args = [
        "--prompts",
        str(prompts),
        "--batch-size",
        "1",
        "--steps",
        "4",
        "--height",
        "64",
        "--width",
        "64",
        "--executor",
        "uni",
    ]
    reference = tmp_path / "reference"
    assert generate("none", *args, "--output", str(reference)).returncode == 0

    output = tmp_path / "killed"
    gate = JobGate(
        tmp_path / "gate", after=2
    )  # the engine holds after two images: the kill lands mid-run
    job = subprocess.Popen(
        [*LAUNCH["none"], "generate", *args, "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=gate.env({**os.environ, "OMP_NUM_THREADS": "1"}),
        start_new_session=True,
    )
    try:
        gate.wait_held(job)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    first = manifest(output)
    assert len(first) == 2, "the kill lands while the engine holds after two images"
    assert not list((output / "images").glob(".*")) or all(
        p.suffix == ".part" for p in (output / "images").glob(".*")
    )

    resumed = generate("none", *args, "--output", str(output))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert run["totals"]["images_skipped_as_done"] == len(first)
    assert run["totals"]["images_ok"] == 12 - len(first)
    assert len(manifest(output)) == 12
    assert images(output) == images(reference)


def test_a_failing_item_is_recorded_and_the_rest_finish(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "fine one"}\n'
        '{"prompt": "too many steps", "steps": 5000}\n'
        '{"prompt": "fine two"}\n'
    )
    output = tmp_path / "out"
    # 5000 steps pass the (raised) request limit and fail in the scheduler, at run time
    done = generate(
        "mpiexec",
        "--prompts",
        str(prompts),
        "--output",
        str(output),
        *COMMON[:2],
        "--max-steps",
        "5000",
    )
    assert done.returncode == 3, done.stderr[-3000:]
    by_id = {line["id"]: line for line in manifest(output)}
    assert by_id["000001"]["status"] == "ok" and by_id["000003"]["status"] == "ok"
    assert by_id["000002"]["status"] == "error" and by_id["000002"]["error"]
    assert json.loads((output / "run.json").read_text())["status"] == "items_failed"


def test_batch_invariant_images_do_not_depend_on_batch_size(tmp_path, prompt_file):
    outputs = []
    for batch_size in ("1", "3"):
        output = tmp_path / f"bs{batch_size}"
        done = generate(
            "none",
            "--prompts",
            str(prompt_file),
            "--output",
            str(output),
            "--batch-size",
            batch_size,
            "--batch-invariant",
            "--executor",
            "uni",
            "--model",
            "tiny-dit",
            *COMMON,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(images(output))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "/no/such/file.txt"], "does not exist"),
        (["--prompts", "{bad_jsonl}"], "bad.jsonl:2: not valid JSON"),
        (["--prompts", "{empty}"], "no prompts in"),
        (["--prompt", "x", "--model", "/no/such/model"], "does not exist or is not a directory"),
        (["--prompt", "x", "--tp", "3"], "--tp 3 needs a multiple of 3 ranks; this job has 2"),
        (["--prompt", "x", "--height", "60"], "height must be a positive multiple of 8"),
        (["--prompt", "x", "--steps", "0"], "Invalid value for '--steps'"),
    ],
)
def test_bad_input_exits_2_with_one_message_before_loading(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (tmp_path / "empty.txt").write_text("\n")
    args = [a.format(bad_jsonl=tmp_path / "bad.jsonl", empty=tmp_path / "empty.txt") for a in args]
    done = generate("mpiexec", *args, "--output", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    assert "loaded" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "launcher, flags",
    [
        ("mpiexec", ["--tp", "2"]),
        ("torchrun", ["--cfg-parallel"]),
        ("none", ["--tp", "2", "--num-gpus", "2"]),
    ],
    ids=["mpiexec-tp2", "torchrun-cfg", "mp-tp2"],
)
def test_tensor_and_cfg_parallel_generate_the_same_images(
    runs, prompt_file, tmp_path, launcher, flags
):
    """One replica of two ranks makes the images one rank makes (tiny-unet: GEGLU sharded)."""
    import numpy as np
    from PIL import Image

    output = tmp_path / "out"
    done = generate(
        launcher,
        "--prompts",
        str(prompt_file),
        "--output",
        str(output),
        "--batch-size",
        "2",
        "--model",
        "tiny-unet",
        *COMMON,
        *flags,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run = json.loads((output / "run.json").read_text())
    assert run["layout"]["replicas"] == 1 and run["layout"]["replica_size"] == 2
    reference = runs["none"] / "images"
    for path in sorted((output / "images").glob("*.png")):
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(reference / path.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, path.name  # float noise of ~1e-6 may flip one level


def test_heads_not_divisible_by_tp_end_the_job_with_a_clear_error(tmp_path):
    import torch
    from diffusers import PixArtTransformer2DModel

    pipeline = load_pipeline(str(ensure_tiny_model("tiny-dit")), None, torch.float32)
    pipeline.transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=32,
        caption_channels=32,
        norm_num_groups=8,
    )
    pipeline.save_pretrained(str(tmp_path / "three-heads"))
    done = generate(
        "mpiexec",
        "--prompt",
        "x",
        "--output",
        str(tmp_path / "out"),
        "--tp",
        "2",
        "--model",
        str(tmp_path / "three-heads"),
        *COMMON,
    )
    assert done.returncode == 1
    assert "heads" in done.stderr and "tp" in done.stderr and "Traceback" not in done.stderr
