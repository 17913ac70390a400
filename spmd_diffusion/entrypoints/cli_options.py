"""The command line and the ``--config`` file, generated from the option table
(:mod:`spmd_diffusion.entrypoints.options`): :func:`with_options` gives a command its click
options and hands the command one :class:`OptionValues` instead of a keyword per option."""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import tomllib

from spmd_diffusion.entrypoints.options import Option, options_of


class OptionValues:
    """The values of one command's options, by name (``values.output``), and grouped by
    where they go (``values.of("config")``: the OmniDiffusionConfig keywords)."""

    def __init__(self, command: str, values: dict[str, Any]) -> None:
        self.command = command
        self.values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(f"{self.__dict__.get('command')} has no option {name!r}") from None

    def of(self, target: str) -> dict[str, Any]:
        """Every value of the options whose value goes to ``target`` (config, run, command)."""
        return {
            option.name: self.values[option.name]
            for option in options_of(self.command)
            if option.target == target
        }


def with_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give ``function`` the click options of ``command`` (and ``--config FILE``); it is called
    with one :class:`OptionValues` (options declared elsewhere arrive in it too)."""

    def decorate(function: Callable[[OptionValues], Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def call(**values: Any) -> Any:
            return function(OptionValues(command, values))

        for option in reversed(options_of(command)):
            call = click_option(option)(call)
        return config_option(call)

    return decorate


def click_type(option: Option) -> Any:
    bounded = option.minimum is not None or option.maximum is not None
    if option.choices:
        return click.Choice(list(option.choices))
    if option.kind == "int":
        return click.IntRange(option.minimum, option.maximum) if bounded else click.INT
    if option.kind == "float":
        return (
            click.FloatRange(option.minimum, option.maximum, min_open=option.open_minimum)
            if bounded
            else click.FLOAT
        )
    if option.kind == "file":
        return click.Path(dir_okay=False)
    if option.kind == "dir":
        return click.Path(file_okay=False)
    return click.STRING


def click_option(option: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one declaration."""
    declarations = [*option.flags, *([option.short] if option.short else []), option.name]
    settings: dict[str, Any] = {"help": option.help}
    if option.kind == "flag":
        if option.off_flag:
            declarations[0] = f"{option.flags[0]}/{option.off_flag}"
            settings.update(default=option.default, show_default=True)
        else:
            settings["is_flag"] = True
        return click.option(*declarations, **settings)
    if option.default is not None:  # click 8.3: an explicit None would count as given
        settings.update(default=option.default, show_default=True)
    settings.update(
        type=click_type(option),
        multiple=option.multiple,
        required=option.required,
        metavar=option.metavar,
        envvar=option.envvar,
    )
    if option.kind == "float":
        settings["callback"] = finite_number
    elif option.comma_list:
        settings["callback"] = comma_list
    return click.option(*declarations, **settings)


def comma_list(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def finite_number(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """NaN and infinity parse as floats but are no setting (and are not JSON)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", param=param)
    return value


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        callback=load_config_file,
        is_eager=True,
        expose_value=False,
        help="JSON or TOML file of option defaults (keys: the flag names, e.g. batch-size).",
    )(command)


def load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE`` (JSON or TOML): option defaults, overridden by the command line. Keys
    are the command's flag names (``batch-size`` or ``batch_size``, ``tp``, ``max-steps``,
    ``prompts``); each value must have its option's type (no silent coercion: ``true`` is no
    number, ``1.7`` no integer) and passes the flag's own checks (ranges, choices)."""
    if not value:
        return value
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a table/object of option values")
    keys = config_keys(ctx.command)
    params = {param.name: param for param in ctx.command.params}
    defaults = {}
    for key, item in data.items():
        option = keys.get(key) or keys.get(key.replace("_", "-"))
        if option is None:
            raise click.BadParameter(
                f"{value}: unknown option {key!r} (keys are the flag names, e.g. batch-size)"
            )
        defaults[option.name] = config_value(
            ctx, option, params[option.name], item, f"{value}: {key}"
        )
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_keys(command: click.Command) -> dict[str, Option]:
    """Config-file key (a flag's name without its dashes) -> the option it sets."""
    return {key: option for option in options_of(command.name or "") for key in option.keys}


def config_value(
    ctx: click.Context, option: Option, param: click.Parameter, item: Any, where: str
) -> Any:
    """A config value checked against its declaration: the JSON/TOML type first (bool is no
    number, a float no integer), then the click option's own conversion and checks."""
    if option.multiple:
        items = [item] if isinstance(item, str) else item
        if not isinstance(items, list) or not all(isinstance(entry, str) for entry in items):
            raise click.BadParameter(
                f"{where} must be a string or a list of strings, got {json.dumps(item)}"
            )
        single = copy.copy(param)
        single.multiple = False
        return [single_value(ctx, option, single, entry, where) for entry in items]
    return single_value(ctx, option, param, item, where)


def single_value(
    ctx: click.Context, option: Option, param: click.Parameter, item: Any, where: str
) -> Any:
    """One value (a repeatable option's: one entry) checked and converted."""
    if option.kind == "flag":
        expected, ok = "true or false", isinstance(item, bool)
    elif option.kind == "int":
        expected, ok = "an integer", isinstance(item, int) and not isinstance(item, bool)
    elif option.kind == "float":
        expected, ok = "a number", isinstance(item, (int, float)) and not isinstance(item, bool)
    else:
        expected, ok = "a string", isinstance(item, str)
    if not ok:
        raise click.BadParameter(
            f"{where} must be {expected}, got {json.dumps(item, default=repr)}"
        )
    try:
        converted = param.type.convert(item, param, ctx)
        if param.callback is not None:
            converted = param.callback(ctx, param, converted)
        return converted
    except click.BadParameter as exc:
        raise click.BadParameter(f"{where}: {exc.message}") from None
