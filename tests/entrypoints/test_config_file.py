"""``--config FILE``: keys are the flag names, every value type-checked with one line naming the
file and key, never coerced silently; the command line wins."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from spmd_diffusion.data import FLAT_NAMES
from spmd_diffusion.entrypoints.cli import cli, main
from spmd_diffusion.entrypoints.cli_options import config_keys
from spmd_diffusion.entrypoints.options import options_of
from spmd_diffusion.jobs.options import GenerateOptions


def run(tmp_path, capsys, config: str, suffix: str = ".json", *extra: str) -> tuple[int, str]:
    path = tmp_path / f"c{suffix}"
    path.write_text(config)
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "generate",
                "--config",
                str(path),
                "--output",
                str(tmp_path / "out"),
                "--executor",
                "uni",
                *extra,
            ]
        )
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"max_batch_size": 2}', "unknown option 'max_batch_size' (keys are the flag names"),
        ('{"trace_file": "t"}', "unknown option 'trace_file'"),
        ('{"height": [64]}', "height must be an integer, got [64]"),
        ('{"steps": true}', "steps must be an integer, got true"),
        ('{"images_per_prompt": 1.7}', "images_per_prompt must be an integer, got 1.7"),
        ('{"guidance": "high"}', 'guidance must be a number, got "high"'),
        ('{"steps": 0}', "steps: 0 is not in the range"),
        ('{"dtype": "int8"}', "dtype: 'int8' is not one of"),
        ('{"cfg-parallel": "yes"}', "cfg-parallel must be true or false"),
        ('{"lora": [1]}', "lora must be a string or a list of strings"),
        ("[1]", "must hold a table/object of option values"),
    ],
)
def test_bad_config_values_are_one_line_naming_the_file_and_key(tmp_path, capsys, config, message):
    code, err = run(tmp_path, capsys, config, ".json", "--prompt", "x")
    assert code == 2 and err.count(message) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_flag_names_with_dashes_or_underscores_and_toml(tmp_path, capsys):
    config = (
        'batch-size = 2\nmax_steps = 5\nsteps = 2\nheight = 32\nwidth = 32\nprompts = "{prompts}"\n'
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    code, err = run(tmp_path, capsys, config.format(prompts=prompts), ".toml")
    assert code == 0, err
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["options"]["batch_size"] == 2 and run_json["config"]["max_inference_steps"] == 5
    assert run_json["totals"]["images_ok"] == 3


def test_the_command_line_wins(tmp_path, capsys):
    code, err = run(
        tmp_path,
        capsys,
        '{"steps": 2, "height": 32, "width": 32, "prompt": ["from config"]}',
        ".json",
        "--steps",
        "1",
    )
    assert code == 0, err
    line = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert line["num_inference_steps"] == 1 and line["prompt"] == "from config"


def test_every_declared_option_is_a_flag_and_a_config_key():
    for name, command in cli.commands.items():
        declared = options_of(name)
        if not declared:
            continue
        flags = {flag for param in command.params for flag in getattr(param, "opts", [])}
        keys = config_keys(command)
        for option in declared:
            assert set(option.flags) <= flags, (name, option.flags)
            assert all(keys[key] is option for key in option.keys), (name, option.name)
    assert config_keys(cli.commands["serve"])["schedule"].name == "batch_policy"


def test_serve_reads_a_config_file_and_refuses_a_bad_key(tmp_path, capsys):
    path = tmp_path / "serve.toml"
    path.write_text('schedule = "random"\nport = 0\n')
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(path), "--executor", "uni"])
    assert exited.value.code == 2 and "unknown schedule 'random'" in capsys.readouterr().err
    path.write_text('output = "x"\n')
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(path)])
    assert exited.value.code == 2 and "unknown option 'output'" in capsys.readouterr().err


def test_a_required_option_is_missing_unless_the_file_gives_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "x", "--executor", "uni"])
    assert exited.value.code == 2 and "Missing option '--output'" in capsys.readouterr().err
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"output": str(tmp_path / "out"), "prompt": "x", "steps": 0}))
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--config", str(path)])
    assert exited.value.code == 2 and "steps: 0 is not in the range" in capsys.readouterr().err


def test_every_option_lands_in_a_field_of_its_target():
    run = {option.name for option in options_of("generate") if option.target == "run"}
    assert run == {field.name for field in fields(GenerateOptions)}
    for command in ("generate", "serve", "info", "worker"):
        config = {option.name for option in options_of(command) if option.target == "config"}
        assert config <= set(FLAT_NAMES), command
