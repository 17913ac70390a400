"""LoRA adapters (run-wide ``--lora``, per-item ``lora``) and ``--scheduler``: parsing and
checks before loading, then real jobs on the tiny UNet with a random LoRA saved by
diffusers' own ``save_lora_weights``."""

# ruff: noqa: PLC0415 - heavy modules load on first use (PIL)

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import make_random_lora
from launch import BIN

from spmd_diffusion.data import OmniDiffusionConfig
from spmd_diffusion.entrypoints.cli import main
from spmd_diffusion.jobs.generate import plan_generation
from spmd_diffusion.jobs.options import GenerateOptions
from spmd_diffusion.models.lora import LoraSpec, parse_lora, parse_loras
from spmd_diffusion.models.schedulers import check_scheduler, parse_scheduler_option
from spmd_diffusion.request import OmniDiffusionRequest


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("/loras/a", LoraSpec("/loras/a", 1.0)),
        ("/loras/a:0.5", LoraSpec("/loras/a", 0.5)),
        ("org/style-lora:0", LoraSpec("org/style-lora", 0.0)),
        ("org/style-lora:-1.5", LoraSpec("org/style-lora", -1.5)),
        (
            "weird:name",
            LoraSpec("weird:name", 1.0),
        ),  # a suffix that is no number is part of the path
    ],
)
def test_lora_specs(spec, parsed):
    assert parse_lora(spec) == parsed


@pytest.mark.parametrize(
    "value, message",
    [
        (["a:nan"], "finite"),
        (["a", "a:0.5"], "names a more than once"),
        ([""], "PATH_OR_ID"),
        (5, "must be a list"),
    ],
)
def test_bad_lora_specs(value, message):
    with pytest.raises(ValueError, match=message):
        parse_loras(value)


def test_lora_in_config_and_request():
    assert OmniDiffusionConfig(lora=("a:0.5",)).lora == ["a:0.5"]
    with pytest.raises(ValueError, match="not supported with tensor parallelism"):
        OmniDiffusionConfig(lora=["a"], tensor_parallel_size=2)
    assert OmniDiffusionRequest(prompt="x", lora="a:2").lora == ["a:2"]
    keys = {
        OmniDiffusionRequest(prompt="x", lora=lora).batch_key()
        for lora in (None, [], ["a"], ["a:0.5"])
    }
    assert len(keys) == 4, "items with different adapter sets never share a batch"


def test_scheduler_names_and_options_are_checked():
    assert parse_scheduler_option("use_karras_sigmas=true") == ("use_karras_sigmas", True)
    assert parse_scheduler_option("timestep_spacing=trailing") == ("timestep_spacing", "trailing")
    assert parse_scheduler_option("steps_offset=1") == ("steps_offset", 1)
    check_scheduler("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})
    with pytest.raises(ValueError, match="not a diffusers scheduler class"):
        check_scheduler("StableDiffusionPipeline", {})
    with pytest.raises(ValueError, match="EulerDiscreteScheduler takes no option no_such_knob"):
        check_scheduler("EulerDiscreteScheduler", {"no_such_knob": 1})
    with pytest.raises(ValueError, match="scheduler_options need a scheduler"):
        OmniDiffusionConfig(scheduler_options={"a": 1})


@pytest.mark.parametrize(
    "args, line, message",
    [
        (
            ["--scheduler", "NoSuchScheduler"],
            None,
            "scheduler 'NoSuchScheduler' is not a diffusers scheduler class",
        ),
        (
            ["--scheduler", "DDIMScheduler", "--scheduler-option", "bogus=1"],
            None,
            "DDIMScheduler takes no option bogus",
        ),
        (["--scheduler-option", "=1"], None, "a scheduler option is key=value"),
        (
            ["--lora", "/no/such/lora.safetensors"],
            None,
            "LoRA '/no/such/lora.safetensors' does not exist",
        ),
        (["--lora", "x:inf"], None, "LoRA scale must be a finite number"),
        (
            [],
            '{"prompt": "x", "lora": "missing.safetensors:0.5"}',
            "p.jsonl:1: LoRA '{dir}/missing.safetensors' does not exist",
        ),
        ([], '{"prompt": "x", "lora": 3}', "p.jsonl:1: lora must be a list"),
    ],
)
def test_bad_lora_and_scheduler_input_exits_2_before_loading(tmp_path, capsys, args, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text((line or '{"prompt": "x"}') + "\n")
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.count(message.format(dir=tmp_path)) == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# -- real jobs ----------------------------------------------------------------------------------


def generate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "omni-diffuse"),
            "generate",
            "--executor",
            "uni",
            "--model",
            "tiny-unet",
            "--steps",
            "2",
            "--height",
            "32",
            "--width",
            "32",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pngs(output: Path) -> dict[str, bytes]:
    """Each image's pixels (its file also carries its record, which names the adapters)."""
    from PIL import Image

    return {
        path.stem: Image.open(path).convert("RGB").tobytes()
        for path in (output / "images").glob("*.png")
    }


def lines(output: Path) -> dict[str, dict]:
    return {
        line["id"]: line
        for line in map(json.loads, (output / "manifest.jsonl").read_text().splitlines())
    }


@pytest.fixture(scope="module")
def lora_job(tmp_path_factory, tiny_unet):
    """prompts.jsonl beside a random LoRA; item 'own' names it (scale 1, path relative to the
    file), item 'none' runs without adapters, the others take the run's."""
    root = tmp_path_factory.mktemp("lora-job")
    make_random_lora(root / "style", tiny_unet, seed=3)
    items = [
        {"prompt": "a red house", "id": "base"},
        {"prompt": "a red house", "id": "own", "lora": "style:1"},
        {"prompt": "a red house", "id": "none", "lora": []},
        {"prompt": "a blue boat", "id": "boat"},
    ]
    for item in items:
        item["seed"] = 7
    (root / "prompts.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return root


@pytest.fixture(scope="module")
def plain(lora_job) -> Path:
    """The job without --lora or --scheduler: what the others are compared with."""
    output = lora_job / "plain"
    done = generate(
        "--prompts", str(lora_job / "prompts.jsonl"), "--output", str(output), "--batch-size", "4"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lora_changes_the_image_and_scale_0_gives_the_base_image(lora_job, plain):
    prompts = str(lora_job / "prompts.jsonl")
    zero = lora_job / "zero"
    done = generate(
        "--prompts",
        prompts,
        "--output",
        str(zero),
        "--batch-size",
        "4",
        "--lora",
        f"{lora_job / 'style'}:0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    base, scaled = pngs(plain), pngs(zero)
    assert scaled["base"] == base["base"] and scaled["boat"] == base["boat"], (
        "scale 0 is the base model"
    )
    assert scaled["none"] == base["none"]
    # same prompt and seed as 'base': only the adapter (the item's own, at scale 1) differs
    assert scaled["own"] != scaled["base"] and base["own"] != base["base"], (
        "the LoRA changes the image"
    )
    assert scaled["own"] == base["own"], "an item's own adapter set does not depend on the run's"
    manifest = lines(zero)
    assert manifest["own"]["lora"] == [{"source": str(lora_job / "style"), "scale": 1.0}]
    assert manifest["base"]["lora"] == [{"source": str(lora_job / "style"), "scale": 0.0}]
    assert "lora" not in manifest["none"] and "lora" not in lines(plain)["base"]
    run = json.loads((zero / "run.json").read_text())
    assert run["config"]["lora"] == [f"{lora_job / 'style'}:0"]
    # The adapter is part of the resume fingerprint: another scale redoes everything ...
    again = generate(
        "--prompts",
        prompts,
        "--output",
        str(zero),
        "--batch-size",
        "4",
        "--lora",
        f"{lora_job / 'style'}:0",
        timeout=60,
    )
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-3000:]

    options = GenerateOptions(
        output=str(zero), prompts_file=prompts, steps=2, height=32, width=32, batch_size=4
    )
    same = plan_generation(options, OmniDiffusionConfig(lora=[f"{lora_job / 'style'}:0"]))
    other = plan_generation(options, OmniDiffusionConfig(lora=[f"{lora_job / 'style'}:0.5"]))
    assert len(same.done) == 4 and not other.done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scheduler_switches_the_class_and_is_recorded(lora_job, plain, tmp_path):
    euler = tmp_path / "euler"
    done = generate(
        "--prompts",
        str(lora_job / "prompts.jsonl"),
        "--output",
        str(euler),
        "--batch-size",
        "4",
        "--scheduler",
        "EulerDiscreteScheduler",
        "--scheduler-option",
        "timestep_spacing=trailing",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {line["scheduler"] for line in lines(plain).values()} == {
        "DDIMScheduler"
    }  # the model's own
    assert {line["scheduler"] for line in lines(euler).values()} == {"EulerDiscreteScheduler"}
    run = json.loads((euler / "run.json").read_text())
    assert run["config"]["scheduler"] == "EulerDiscreteScheduler"
    assert run["config"]["scheduler_options"] == {"timestep_spacing": "trailing"}
    assert pngs(plain)["base"] != pngs(euler)["base"]
    assert lines(plain)["base"]["fingerprint"] != lines(euler)["base"]["fingerprint"]
