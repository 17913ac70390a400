"""Prompt files: formats, ids, per-item settings, and every bad-input message."""

from __future__ import annotations

import json

import pytest

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.engine.seeding import derive_seed
from spmd_diffusion.jobs.generate import GenerateOptions, build_requests, plan_generation
from spmd_diffusion.jobs.prompts import InputError, read_items


def test_txt_ids_are_line_numbers_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n")
    items = read_items(str(path))
    assert [(i.id, i.prompt, i.line) for i in items] == [
        ("000001", "a cat", 1),
        ("000003", "a dog", 3),
    ]


def test_jsonl_settings_ids_and_extra_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {
            "prompt": "a cat",
            "id": "cat-1",
            "seed": 5,
            "steps": 3,
            "guidance": 2.5,
            "height": 32,
            "width": 48,
            "negative_prompt": "blurry",
            "style": "photo",
        },
        {"prompt": "a dog"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    first, second = read_items(str(path))
    assert first.id == "cat-1" and first.meta == {"style": "photo"}
    assert first.settings == {
        "negative_prompt": "blurry",
        "seed": 5,
        "num_inference_steps": 3,
        "guidance_scale": 2.5,
        "height": 32,
        "width": 48,
    }
    assert second.id == "000002" and second.settings == {}


def test_csv_with_header_converts_numbers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,seed,steps,guidance,note\nx1,a cat,7,2,3.5,hello\n,a dog,,,,\n")
    first, second = read_items(str(path))
    assert (first.id, first.settings["seed"], first.settings["guidance_scale"], first.meta) == (
        "x1",
        7,
        3.5,
        {"note": "hello"},
    )
    assert second.id == "000002"


def test_command_line_prompts():
    assert [i.prompt for i in read_items(None, ("one", "two"))] == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: not valid JSON"),
        ("p.jsonl", '{"prompt": "ok"}\n["x"]\n', r"p.jsonl:2: each line must be a JSON object"),
        ("p.jsonl", '{"id": "a"}\n', r"p.jsonl:1: 'prompt' is required"),
        ("p.jsonl", '{"prompt": "a", "id": "../etc"}\n', r"id '../etc' must be"),
        (
            "p.jsonl",
            '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
            r"id 'x' repeats line 1",
        ),
        ("p.txt", "\n\n", r"no prompts in"),
        ("p.csv", "text\nhello\n", r"needs a header row with a 'prompt' column"),
        ("p.yaml", "prompt: x\n", r"use .txt, .jsonl or .csv"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_items(str(path))


def test_missing_file_and_both_sources(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_items(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="not both"):
        read_items(str(tmp_path / "nope.txt"), ("x",))


def test_requests_take_run_settings_then_item_settings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a", "id": "a", "steps": 9}\n{"prompt": "b", "id": "b", "seed": 3}\n'
    )
    options = GenerateOptions(
        output=str(tmp_path / "out"),
        prompts_file=str(path),
        steps=4,
        height=64,
        images_per_prompt=2,
    )
    first, second = build_requests(read_items(str(path)), options, run_seed=11)
    assert (
        first.num_inference_steps == 9 and first.height == 64 and first.seed == derive_seed(11, "a")
    )
    assert (
        second.num_inference_steps == 4 and second.seed == 3 and second.num_images_per_prompt == 2
    )


def test_invalid_item_setting_names_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "height": 60}\n')
    options = GenerateOptions(output=str(tmp_path / "out"), prompts_file=str(path))
    with pytest.raises(InputError, match=r"p.jsonl:2: height must be a positive multiple of 8"):
        plan_generation(options, OmniDiffusionConfig())


def test_plan_chunks_are_fixed_by_the_item_list(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"p{i}", "steps": 8 if i % 3 == 0 else 4}) + "\n"
            for i in range(7)
        )
    )
    options = GenerateOptions(output=str(tmp_path / "out"), prompts_file=str(path), batch_size=2)
    plan = plan_generation(options, OmniDiffusionConfig())
    ids = [[request.request_id for _, request in batch] for batch in plan.batches()]
    # compatible items (same steps) share batches, in file order, two at a time; the plan
    # reads the file as a stream and hands each batch out as soon as it is full
    assert ids == [["000002", "000003"], ["000001", "000004"], ["000005", "000006"], ["000007"]]
    assert (plan.items, plan.images_total, plan.batches_to_run) == (7, 7, 4)
