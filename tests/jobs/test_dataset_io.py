"""Dataset-scale inputs and outputs, in process (no model): parquet, ``datasets`` directories
and OpenAI batch files read as streams; the fixed batches of a stream; images that carry
their prompt, seed and settings; WebDataset shards; refusals before loading (exit 2)."""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL)

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from spmd_diffusion import DiffusionEngine
from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.engine.batching import chunk_requests, iter_chunks
from spmd_diffusion.engine.seeding import derive_seed
from spmd_diffusion.entrypoints.cli import main
from spmd_diffusion.errors import InputError
from spmd_diffusion.executor import DiffusionExecutor
from spmd_diffusion.jobs.encoding import encode_image, read_record
from spmd_diffusion.jobs.generate import GenerateOptions, plan_generation
from spmd_diffusion.jobs.shards import ShardSink, close_open_shards
from spmd_diffusion.jobs.sources import Columns, open_source
from spmd_diffusion.jobs.sources.tables import plan_columns
from spmd_diffusion.request import MAX_PROMPT_CHARS, OmniDiffusionRequest
from spmd_diffusion.utils.packing import Packer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups: read in batches


def test_parquet_rows_become_items_with_ids_settings_and_meta(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet(
        path,
        {
            "caption": ["a cat", "a dog", "a cow"],
            "key": [10, 11, 12],
            "seed": [5, None, 7],
            "height": [32, 32, 64],
            "score": [0.5, 0.7, 0.9],
            "blob": [b"x", b"y", b"z"],
        },
    )
    items = list(open_source(str(path), columns=Columns(prompt="caption", id="key")))
    assert [(i.id, i.prompt, i.line) for i in items] == [
        ("10", "a cat", 1),
        ("11", "a dog", 2),
        ("12", "a cow", 3),
    ]
    assert items[0].settings == {"seed": 5, "height": 32} and items[1].settings == {"height": 32}
    assert items[2].meta == {"score": 0.9}  # bytes columns are not read


def test_parquet_ids_default_to_row_numbers(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet(path, {"prompt": ["a", "b", "c"]})
    assert [i.id for i in open_source(str(path))] == ["000001", "000002", "000003"]


@pytest.mark.parametrize(
    "columns, table, message",
    [
        (
            Columns(),
            {"text": ["a"]},
            "no column 'prompt' for the prompt (columns: text); name it with --prompt-column",
        ),
        (
            Columns(prompt="text"),
            {"text": [1, 2]},
            "column 'text' holds int64, but the prompt must be text",
        ),
        (Columns(id="nope"), {"prompt": ["a"]}, "no column 'nope' for the id"),
        (
            Columns(),
            {"prompt": ["a"], "id": [0.5]},
            "column 'id' holds double, but the id must be text or integer",
        ),
        (
            Columns(),
            {"prompt": ["a"], "steps": ["many"]},
            "column 'steps' holds string, but steps must be integer",
        ),
        (Columns(), {"prompt": ["a", None]}, "row 2: 'prompt' is required"),
    ],
)
def test_parquet_bad_columns_are_one_clear_error(tmp_path, columns, table, message):
    path = tmp_path / "p.parquet"
    write_parquet(path, table)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(open_source(str(path), columns=columns))


def test_unreadable_parquet_is_refused(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="not a readable parquet file"):
        open_source(str(path))


def test_datasets_directory_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["t1", "t2"], "id": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["x1"], "id": ["c"]}),
        }
    )
    data.save_to_disk(str(tmp_path / "ds"))
    assert [i.id for i in open_source(str(tmp_path / "ds"))] == ["a", "b"]  # train by default
    assert [i.prompt for i in open_source(str(tmp_path / "ds"), columns=Columns(split="test"))] == [
        "x1"
    ]
    with pytest.raises(InputError, match="no split 'validation' \\(splits: train, test\\)"):
        open_source(str(tmp_path / "ds"), columns=Columns(split="validation"))


def test_hub_dataset_by_name_goes_through_load_dataset(monkeypatch):
    """hf:NAME asks datasets.load_dataset for the split (its cache answers offline); a
    dataset it cannot load is one clear error."""
    datasets = pytest.importorskip("datasets")
    asked = []

    def load_dataset(name, split=None):
        asked.append((name, split))
        if name != "owner/prompts":
            raise FileNotFoundError(f"Couldn't find '{name}' on the Hub or in the cache")
        return datasets.Dataset.from_dict({"text": ["one", "two"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    items = list(
        open_source("hf:owner/prompts", columns=Columns(prompt="text", split="validation"))
    )
    assert [i.prompt for i in items] == ["one", "two"] and asked == [
        ("owner/prompts", "validation")
    ]
    with pytest.raises(InputError, match="hf:owner/missing: cannot load the dataset"):
        open_source("hf:owner/missing")


def test_openai_batch_lines(tmp_path):
    path = tmp_path / "batch.jsonl"
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {
                "model": "m",
                "prompt": "a fox",
                "n": 2,
                "size": "64x32",
                "response_format": "b64_json",
            },
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/images/generations",
            "body": {
                "prompt": "a hen",
                "seed": 3,
                "num_inference_steps": 2,
                "negative_prompt": "blur",
            },
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    first, second = open_source(str(path))
    assert (first.id, first.prompt, first.settings) == (
        "a",
        "a fox",
        {"width": 64, "height": 32, "num_images_per_prompt": 2},
    )
    assert first.meta == {"model": "m", "response_format": "b64_json"}
    assert second.settings == {"seed": 3, "num_inference_steps": 2, "negative_prompt": "blur"}


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"custom_id": "a", "url": "/v1/chat/completions", "body": {"prompt": "x"}},
            "only POST /v1/images/generations",
        ),
        (
            {"custom_id": "a", "body": {"prompt": "x", "size": "big"}},
            "size 'big' must be 'WIDTHxHEIGHT'",
        ),
        ({"custom_id": "a", "body": {"prompt": "x", "n": 0}}, "n must be a positive integer"),
        ({"custom_id": "a", "body": {"n": 1}}, "'prompt' is required"),
        ({"custom_id": "", "body": {"prompt": "x"}}, "'custom_id' is required"),
    ],
)
def test_openai_batch_bad_lines(tmp_path, line, message):
    path = tmp_path / "batch.jsonl"
    path.write_text(
        json.dumps({"custom_id": "ok", "body": {"prompt": "fine"}}) + "\n" + json.dumps(line) + "\n"
    )
    with pytest.raises(InputError, match=f"batch.jsonl:2: .*{message}"):
        list(open_source(str(path)))


def test_stream_chunks_are_the_fixed_chunks():
    rng = random.Random(3)
    requests = [
        OmniDiffusionRequest(
            prompt="p",
            request_id=str(i),
            num_inference_steps=rng.choice([1, 2, 3]),
            num_images_per_prompt=rng.choice([1, 2, 5]),
        )
        for i in range(300)
    ]
    for max_images in (1, 3, 4, 8):
        streamed = sorted(
            [r.request_id for r in chunk] for chunk in iter_chunks(requests, max_images)
        )
        assert streamed == sorted(
            [r.request_id for r in chunk] for chunk in chunk_requests(requests, max_images)
        )
        counter = Packer(max_images)  # the planning pass counts them without building them
        for request in requests:
            counter.add(request.batch_key(), request.num_images_per_prompt)
        assert counter.chunks == len(streamed)


def test_plan_streams_and_counts_without_listing(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(11)))
    options = GenerateOptions(
        output=str(tmp_path / "out"), prompts_file=str(path), batch_size=3, images_per_prompt=2
    )
    plan = plan_generation(options, OmniDiffusionConfig(seed=4))
    assert (plan.items, plan.images_total, plan.batches_to_run, plan.images_to_make) == (
        11,
        22,
        4,
        22,
    )
    batches = list(plan.batches())
    assert [len(batch) for batch in batches] == [3, 3, 3, 2]
    jsonl = tmp_path / "p.jsonl"  # a shape of its own: a batch of its own
    jsonl.write_text(
        "".join(
            json.dumps({"prompt": f"p{i}", **({"steps": 3} if i in (2, 5) else {})}) + "\n"
            for i in range(7)
        )
    )
    mixed = plan_generation(
        GenerateOptions(output=str(tmp_path / "out"), prompts_file=str(jsonl), batch_size=2),
        OmniDiffusionConfig(),
    )
    assert mixed.batches_to_run == len(list(mixed.batches())) == 4
    _, request = batches[1][0]
    assert (request.request_id, request.seed, request.num_images_per_prompt) == (
        "000004",
        derive_seed(4, "000004"),
        2,
    )


def test_repeated_ids_in_a_table_name_both_rows(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet(path, {"prompt": ["a", "b", "c"], "id": ["x", "y", "x"]})
    with pytest.raises(InputError, match=r"p.parquet:3: id 'x' repeats line 1"):
        plan_generation(
            GenerateOptions(output=str(tmp_path / "out"), prompts_file=str(path)),
            OmniDiffusionConfig(),
        )


# -- outputs --------------------------------------------------------------------------------
INFO = {
    "id": "a",
    "index": 0,
    "prompt": 'a cät <&> "q"',
    "negative_prompt": "blur",
    "seed": 5,
    "num_inference_steps": 2,
    "guidance_scale": 7.5,
    "height": 32,
    "width": 32,
    "model": "m",
}


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_images_carry_prompt_seed_and_settings(image_format):
    from PIL import Image

    data = encode_image(Image.new("RGB", (32, 32), "red"), image_format, 80, INFO)
    assert read_record(data) == INFO
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[image_format]
        if image_format == "png":
            assert image.info["parameters"].startswith(
                'a cät <&> "q"\nNegative prompt: blur\nSteps: 2'
            )
            assert "Seed: 5" in image.info["parameters"]
        else:
            comment = image.getexif().get_ifd(0x8769)[0x9286]
            assert comment.startswith(b"UNICODE\x00") and "Seed: 5" in comment[8:].decode(
                "utf-16-be"
            )
            assert (
                comment[8:]
                .decode("utf-16-be")
                .startswith('a cät <&> "q"\nNegative prompt: blur\nSteps: 2')
            )


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_an_image_holds_its_prompt_once_and_the_longest_prompt_fits(image_format):
    """The texts live in ``parameters`` only (the record takes them back by length): a long
    prompt no longer triples the file, and the longest non-Latin prompt and negative prompt
    still fit JPEG's 64 KB EXIF segment (16 K characters in the XMP copy did not)."""
    from PIL import Image

    marker = "zq" * 50
    info = dict(INFO, prompt=marker + "x\nNegative prompt: not the negative", negative_prompt="")
    data = encode_image(Image.new("RGB", (16, 16)), image_format, 80, info)
    assert read_record(data) == info
    encoded = marker.encode("utf-16-be") if image_format != "png" else marker.encode()
    assert data.count(encoded) == 1, "the prompt is stored once"
    longest = dict(INFO, prompt="猫" * MAX_PROMPT_CHARS, negative_prompt="犬" * MAX_PROMPT_CHARS)
    data = encode_image(Image.new("RGB", (16, 16)), image_format, 80, longest)
    assert read_record(data) == longest
    assert (
        len(data) < 3 * MAX_PROMPT_CHARS * 2 + 4096
    )  # both texts once (2-3 bytes a character) and the pixels


def test_shard_sink_writes_complete_shards_a_reader_can_read(tmp_path):
    from PIL import Image

    wds = pytest.importorskip("webdataset")

    ids = ["a.b", "c", "d"]
    described = {i: {"prompt": f"p {i}", "model": "m"} for i in ids}
    sink = ShardSink(
        str(tmp_path), attempt=3, shard_size=2, counts={i: 1 for i in ids}, described=described
    )
    output = DiffusionOutput(
        request_ids=ids,
        images=[[Image.new("RGB", (8, 8), c)] for c in ("red", "green", "blue")],
        seeds=[[1], [2], [3]],
        rank=1,
    )
    written = sink.write(output)
    files = [entry for meta in written.metadata for entry in meta["files"]]
    assert [f["key"] for f in files] == ["a%2Eb", "c", "d"] and written.images == [[], [], []]
    events = written.notes["shards"]
    assert [e["path"] for e in events["closed"]] == ["shards/a0003-r0001-000000.tar"] and events[
        "closed"
    ][0]["images"] == 2
    assert (
        tmp_path / "shards" / "a0003-r0001-000001.tar.part"
    ).exists()  # the open one: not a final name yet
    last = close_open_shards(None, str(tmp_path), 3)
    assert [e["path"] for e in last["closed"]] == ["shards/a0003-r0001-000001.tar"]
    samples = list(
        wds.WebDataset(
            [str(p) for p in sorted((tmp_path / "shards").glob("*.tar"))], shardshuffle=False
        )
    )
    assert [s["__key__"] for s in samples] == ["a%2Eb", "c", "d"]
    assert [json.loads(s["json"])["seed"] for s in samples] == [1, 2, 3]
    assert json.loads(samples[0]["json"])["id"] == "a.b"
    with tarfile.open(tmp_path / "shards" / "a0003-r0001-000000.tar") as tar:
        assert tar.getnames() == ["a%2Eb.json", "a%2Eb.png", "c.json", "c.png"]


# -- refusals before loading, through the CLI ----------------------------------------------
@pytest.mark.parametrize(
    "kind, extra, message",
    [
        ("parquet-no-column", [], "no column 'prompt' for the prompt"),
        ("parquet-column-flag", ["--prompt-column", "nope"], "no column 'nope' for the prompt"),
        ("garbage-parquet", [], "not a readable parquet file"),
        ("openai-wrong-url", [], "only POST /v1/images/generations requests can run here"),
        ("not-a-dataset-dir", [], "not a dataset saved with save_to_disk"),
    ],
)
def test_bad_dataset_inputs_exit_2_before_loading(tmp_path, capsys, kind, extra, message):

    if kind == "parquet-no-column":
        path = tmp_path / "p.parquet"
        write_parquet(path, {"text": ["a"]})
    elif kind == "parquet-column-flag":
        path = tmp_path / "p.parquet"
        write_parquet(path, {"prompt": ["a"]})
    elif kind == "garbage-parquet":
        path = tmp_path / "p.parquet"
        path.write_bytes(b"\x00" * 100)
    elif kind == "openai-wrong-url":
        path = tmp_path / "b.jsonl"
        path.write_text(
            json.dumps({"custom_id": "a", "url": "/v1/embeddings", "body": {"prompt": "x"}}) + "\n"
        )
    else:
        path = tmp_path / "dir"
        path.mkdir()
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompts", str(path), "--output", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.count(message) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_stream_is_read_as_replicas_free_up_and_sinks_write_on_rank_0(tmp_path):
    from PIL import Image

    class Instant(DiffusionExecutor):
        """No workers (outputs come back to rank 0, as the http executor's do): one 8x8
        image per request, at once."""

        def _init_executor(self) -> None:
            pass

        def execute_model(self, requests):
            return DiffusionOutput(
                request_ids=[r.request_id for r in requests],
                images=[[Image.new("RGB", (8, 8), "white")] for _ in requests],
                seeds=[r.image_seeds() for r in requests],
                rank=0,
            )

    read: list[int] = []

    def batches():
        for index in range(200):
            read.append(index)
            yield [OmniDiffusionRequest(prompt=f"p{index}", request_id=f"i{index}")]

    outputs = []

    def on_output(output):
        outputs.append((len(read), output))

    with DiffusionEngine(OmniDiffusionConfig(executor_class=Instant, seed=2)) as engine:
        assert not engine.executor.writes_outputs
        engine.generate_stream(
            batches(),
            on_output,
            sinks=lambda batch: ShardSink(
                str(tmp_path),
                0,
                50,
                {r.request_id: 1 for r in batch},
                described={r.request_id: {"prompt": r.prompt} for r in batch},
            ),
        )
    assert len(outputs) == 200 and outputs[0][0] < 200, (
        "the first batch ran before the input was read to its end"
    )
    assert all(
        output.images == [[]] and output.metadata[0]["files"][0]["key"] == output.request_ids[0]
        for _, output in outputs
    )
    assert outputs[-1][1].seeds == [[derive_seed(2, "i199")]]
    close_open_shards(None, str(tmp_path), 0)
    wds = pytest.importorskip("webdataset")
    shards = sorted(str(path) for path in (tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 4
    assert [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)] == [
        f"i{i}" for i in range(200)
    ]


def test_table_columns_take_each_settings_declared_kind(tmp_path):
    """Path settings (image, mask_image, lora) are text columns, num_frames an integer one."""
    pq = pytest.importorskip("pyarrow.parquet")

    write_parquet(
        tmp_path / "p.parquet",
        {
            "prompt": ["a"],
            "image": ["x.png"],
            "lora": ["a.safetensors:0.5"],
            "num_frames": [5],
            "fps": [8],
        },
    )
    mapping = plan_columns(
        pq.read_schema(tmp_path / "p.parquet"), Columns("prompt", None, None), "p.parquet"
    )
    assert {"image", "lora", "num_frames", "fps"} <= set(mapping)
    write_parquet(tmp_path / "q.parquet", {"prompt": ["a"], "num_frames": [5.5]})
    with pytest.raises(
        InputError, match="column 'num_frames' holds double, but num_frames must be integer"
    ):
        plan_columns(
            pq.read_schema(tmp_path / "q.parquet"), Columns("prompt", None, None), "q.parquet"
        )
