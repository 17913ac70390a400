"""``omni-diffuse generate`` on dataset-scale inputs and outputs, for real, on the tiny model:
parquet, a ``datasets`` directory and an OpenAI batch file under ``mpiexec -n 2``; WebDataset
shards read back with ``webdataset`` and equal to the files output of the same job; a job
killed in the middle of a shard resumes into new, complete shards (that a resumed job makes
the same pixels is test_generate_cli's)."""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL)

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from gates import JobGate
from launch import BIN, LAUNCH

from spmd_diffusion.engine.seeding import derive_seed
from spmd_diffusion.jobs.encoding import exif_parameters, read_record

pytestmark = [pytest.mark.launcher, pytest.mark.slow]
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
wds = pytest.importorskip("webdataset")

MPIEXEC = LAUNCH["mpiexec"]
SMALL = [
    "--model",
    "tiny-unet",
    "--steps",
    "2",
    "--height",
    "32",
    "--width",
    "32",
    "--batch-size",
    "2",
]


def generate(command: list[str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "generate", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def manifest(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]


def shard_samples(output: Path) -> list[dict]:
    """Every sample of the shards ``shards.txt`` lists, through the webdataset library."""
    shards = [str(output / line) for line in (output / "shards.txt").read_text().split()]
    return list(wds.WebDataset(shards, shardshuffle=False))


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "prompts.parquet"
    table = pa.table(
        {
            "caption": [f"a picture of thing {i}" for i in range(7)],
            "key": [f"k{i}" for i in range(7)],
            "seed": [100 + i for i in range(7)],
            "source": ["coco"] * 7,
        }
    )
    pq.write_table(table, path, row_group_size=3)
    return path


@pytest.fixture(scope="module")
def parquet_runs(parquet_file, tmp_path_factory) -> dict[str, Path]:
    """The same parquet job to files and to WebDataset shards (3 images a shard)."""
    outputs = {}
    for output_format in ("files", "webdataset"):
        output = tmp_path_factory.mktemp(output_format)
        done = generate(
            MPIEXEC,
            "--prompts",
            str(parquet_file),
            "--prompt-column",
            "caption",
            "--id-column",
            "key",
            "--output",
            str(output),
            "--output-format",
            output_format,
            "--shard-size",
            "3",
            *SMALL,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        outputs[output_format] = output
    return outputs


def test_parquet_under_mpiexec(parquet_runs):
    lines = manifest(parquet_runs["files"])
    assert sorted(line["id"] for line in lines) == [f"k{i}" for i in range(7)]
    assert all(
        line["status"] == "ok" and line["seed"] == 100 + int(line["id"][1:]) for line in lines
    )
    assert {line["meta"]["source"] for line in lines} == {"coco"}
    assert {line["written_by"] for line in lines} == {0, 1}, "both replicas wrote their own images"


def test_webdataset_shards_match_the_files_output(parquet_runs):
    files, shards = manifest(parquet_runs["files"]), manifest(parquet_runs["webdataset"])
    assert {(line["id"], line["seed"]) for line in shards} == {
        (line["id"], line["seed"]) for line in files
    }
    assert all(
        line["status"] == "ok" and line["path"].startswith("shards/") and line["shard_bytes"]
        for line in shards
    )
    assert {line["written_by"] for line in shards} == {0, 1}, "each replica leader wrote shards"
    samples = shard_samples(parquet_runs["webdataset"])
    assert sorted(s["__key__"] for s in samples) == sorted(line["key"] for line in shards)
    by_id = {line["id"]: line for line in files}
    for sample in samples:
        record = json.loads(sample["json"])
        assert (
            record["seed"] == by_id[record["id"]]["seed"]
            and record["prompt"] == by_id[record["id"]]["prompt"]
        )
        # the same bytes as the file of the same image: pixels and embedded metadata alike
        assert sample["png"] == (parquet_runs["files"] / by_id[record["id"]]["path"]).read_bytes()
    run = json.loads((parquet_runs["webdataset"] / "run.json").read_text())
    assert run["status"] == "complete" and run["totals"]["shards_written"] == len(
        (parquet_runs["webdataset"] / "shards.txt").read_text().split()
    )
    assert not list((parquet_runs["webdataset"] / "shards").glob("*.part"))


def test_datasets_directory_under_mpiexec(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["not this one"]}),
            "eval": datasets.Dataset.from_dict(
                {"prompt": [f"eval prompt {i}" for i in range(5)], "steps": [2, 2, 1, 2, 1]}
            ),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    output = tmp_path / "out"
    done = generate(
        MPIEXEC,
        "--prompts",
        str(tmp_path / "ds"),
        "--split",
        "eval",
        "--output",
        str(output),
        *SMALL,
        "--image-format",
        "jpg",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = manifest(output)
    assert sorted(line["id"] for line in lines) == [f"{i:06d}" for i in range(1, 6)]
    assert sorted(line["num_inference_steps"] for line in lines) == [1, 1, 2, 2, 2]
    assert all(line["path"].endswith(".jpg") for line in lines)
    assert {line["rank"] for line in lines} == {0, 1}

    for line in lines:
        assert read_record((output / line["path"]).read_bytes())["prompt"] == line["prompt"]


def test_openai_batch_file_under_mpiexec(tmp_path):
    path = tmp_path / "batch.jsonl"
    bodies = [
        {"prompt": "a red fox", "n": 2, "size": "32x32"},
        {"prompt": "a blue hen", "size": "32x32", "seed": 9},
        {"prompt": "a green owl", "size": "32x32", "model": "dall-e-3"},
    ]
    path.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/images/generations",
                    "body": body,
                }
            )
            + "\n"
            for i, body in enumerate(bodies)
        )
    )
    output = tmp_path / "out"
    done = generate(
        MPIEXEC, "--prompts", str(path), "--output", str(output), *SMALL, "--image-format", "webp"
    )
    assert done.returncode == 0, done.stderr[-4000:]
    by_key = {(line["id"], line["index"]): line for line in manifest(output)}
    assert sorted(by_key) == [("req-0", 0), ("req-0", 1), ("req-1", 0), ("req-2", 0)]
    assert (
        by_key[("req-1", 0)]["seed"] == 9
        and by_key[("req-0", 1)]["seed"] == by_key[("req-0", 0)]["seed"] + 1
    )
    assert by_key[("req-0", 1)]["path"] == "images/req-0_1.webp" and by_key[("req-2", 0)][
        "meta"
    ] == {"model": "dall-e-3"}
    from PIL import Image

    with Image.open(output / by_key[("req-1", 0)]["path"]) as image:
        assert image.format == "WEBP" and "a blue hen" in exif_parameters(image.getexif())


def test_resume_after_a_kill_in_the_middle_of_a_shard(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    uni = [str(BIN / "omni-diffuse")]
    args = [
        "--prompts",
        str(prompts),
        "--batch-size",
        "1",
        "--steps",
        "4",
        "--height",
        "32",
        "--width",
        "32",
        "--executor",
        "uni",
        "--output-format",
        "webdataset",
        "--shard-size",
        "4",
    ]
    output = tmp_path / "killed"
    gate = JobGate(tmp_path / "gate", after=6)  # held after one whole shard and half of the next
    job = subprocess.Popen(
        [*uni, "generate", *args, "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=gate.env({**os.environ, "OMP_NUM_THREADS": "1"}),
        start_new_session=True,
    )
    try:
        gate.wait_held(job)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    first = manifest(output)
    partial = list((output / "shards").glob("*.part"))
    assert len(first) == 4, "the kill lands after one whole shard"
    assert partial, "a shard was half-written when the job died"

    resumed = generate(uni, *args, "--output", str(output), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((output / "shards").glob("*.part")), (
        "the half-written shard was removed, not appended to"
    )
    run = json.loads((output / "run.json").read_text())
    assert run["totals"]["images_skipped_as_done"] == len(first) and run["totals"][
        "images_ok"
    ] == 12 - len(first)
    lines = manifest(output)
    assert sorted(line["id"] for line in lines) == [f"{i:06d}" for i in range(1, 13)]
    old_shards = {line["path"] for line in first}
    assert all(line["path"].startswith("shards/a0001-") for line in lines[len(first) :]), (
        "new shards of a new attempt"
    )
    assert all(line["path"] in old_shards for line in lines[: len(first)])
    samples = shard_samples(output)
    assert sorted(s["__key__"] for s in samples) == [f"{i:06d}" for i in range(1, 13)]

    assert {json.loads(s["json"])["id"]: json.loads(s["json"])["seed"] for s in samples} == {
        f"{i:06d}": derive_seed(0, f"{i:06d}") for i in range(1, 13)
    }
