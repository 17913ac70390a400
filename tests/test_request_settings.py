"""The per-item settings are declared once (spmd_diffusion/request_settings.py): the CLI
flags, the config-file keys, the prompt-file keys and the HTTP fields come from that table,
and a value past a declared bound is refused on every surface, by the request itself too."""

# ruff: noqa: PLC0415 - the server (pydantic, fastapi) is an optional extra: imported after importorskip

from __future__ import annotations

import json

import pytest

from spmd_diffusion.entrypoints.cli import cli, main
from spmd_diffusion.entrypoints.cli_options import config_keys
from spmd_diffusion.jobs.prompts import SETTING_KEYS
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.request_settings import FLAG_SETTINGS, HTTP_SETTINGS, SETTINGS, Setting

BOUNDED = [
    setting
    for setting in SETTINGS
    if setting.minimum is not None or setting.maximum is not None or setting.max_length is not None
]


def outside(setting: Setting) -> list:
    """Values just past each of the setting's bounds."""
    values: list = []
    if setting.max_length is not None:
        values.append("x" * (setting.max_length + 1))
    if setting.minimum is not None:
        values.append(
            setting.minimum
            if setting.open_minimum
            else setting.minimum - (1 if setting.kind == "int" else 0.5)
        )
    if setting.maximum is not None:
        values.append(setting.maximum + 1)
    return values


def test_every_surface_is_generated_from_the_table():
    generate = cli.commands["generate"]
    flags = {flag for param in generate.params for flag in getattr(param, "opts", [])}
    assert {setting.flag for setting in FLAG_SETTINGS} <= flags
    keys = config_keys(generate)
    assert all(
        keys[setting.flag[2:]].name == setting.flag[2:].replace("-", "_")
        for setting in FLAG_SETTINGS
    )
    assert SETTING_KEYS == {setting.key: setting.field for setting in SETTINGS}
    pydantic = pytest.importorskip("pydantic")
    from spmd_diffusion.entrypoints.server import ServerLimits, images_request_model

    model = images_request_model(type("Base", (pydantic.BaseModel,), {}), ServerLimits())
    assert set(model.model_fields) == {setting.http for setting in HTTP_SETTINGS}
    request_fields = set(OmniDiffusionRequest.__dataclass_fields__)
    assert all(setting.field in request_fields for setting in SETTINGS)


@pytest.mark.parametrize("setting", BOUNDED, ids=[setting.key for setting in BOUNDED])
def test_a_value_past_a_bound_is_refused_everywhere(tmp_path, capsys, setting):
    pydantic = pytest.importorskip("pydantic")
    from spmd_diffusion.entrypoints.server import ServerLimits, images_request_model

    http = images_request_model(type("Base", (pydantic.BaseModel,), {}), ServerLimits())
    for value in outside(setting):
        with pytest.raises(ValueError):
            OmniDiffusionRequest(prompt="x", **{setting.field: value})
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"prompt": "x", setting.key: value}) + "\n")
        with pytest.raises(SystemExit) as exited:
            main(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "p.jsonl:1:" in err, (value, err)
        if setting.flag:
            with pytest.raises(SystemExit) as exited:
                main(
                    [
                        "generate",
                        "--prompt",
                        "x",
                        "--output",
                        str(tmp_path / "out"),
                        setting.flag,
                        str(value),
                    ]
                )
            assert exited.value.code == 2, (value, capsys.readouterr().err)
            capsys.readouterr()
        if setting.http:
            with pytest.raises(pydantic.ValidationError):
                http.model_validate({setting.http: value})
    assert not (tmp_path / "out").exists()
