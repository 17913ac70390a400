"""Reading the work: prompt files (.txt, .jsonl, .csv) or prompts from the command line.

Files are read a line at a time (:func:`iter_items`), so a million-line file never sits in
memory; other inputs (parquet, ``datasets``, OpenAI batch files) live in
:mod:`spmd_diffusion.jobs.sources` and produce the same :class:`PromptItem`. Every problem
is an :class:`InputError` that names the file and line, raised on rank 0 before any model
is loaded (the CLI turns it into one message and exit code 2).
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spmd_diffusion.errors import InputError
from spmd_diffusion.request_settings import BY_KEY, FILE_KEYS

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ID_WIDTH = 6  # fixed: an item's id must not change when the file grows
# File keys and the request fields they set (declared once, in request_settings).
SETTING_KEYS = FILE_KEYS
KNOWN_KEYS = {"id", "prompt", *SETTING_KEYS}


@dataclass
class PromptItem:
    """One line of work: its id, prompt, per-item settings and any other keys (kept as metadata)."""

    id: str
    prompt: str
    line: int
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "file:line", for messages about the item's settings


def _item(record: dict[str, Any], line: int, where: str) -> PromptItem:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: 'prompt' is required and must be a non-empty string")
    raw_id = record.get("id")
    if isinstance(raw_id, str) and not raw_id.strip():
        raise InputError(
            f"{where}: id is empty: give the item an id, or leave the key out for its line number"
        )
    item_id = str(raw_id).strip() if raw_id is not None else f"{line:0{ID_WIDTH}d}"
    if not ID_PATTERN.match(item_id):
        raise InputError(
            f"{where}: id {item_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
            "(it names the image file)"
        )
    settings = {}
    for key, field_name in SETTING_KEYS.items():
        value = record.get(key)
        if value not in (None, ""):
            settings[field_name] = value
    meta = {key: value for key, value in record.items() if key not in KNOWN_KEYS}
    return PromptItem(item_id, prompt, line, settings, meta, where)


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines (number, text with its line ending), one at a time: UTF-8, with or
    without a byte-order mark; anything else is refused with the line and the byte that is
    not UTF-8 (binary files included), a NUL byte with its line."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the with below, also on early exit
    except OSError as exc:
        raise InputError(f"cannot read prompt file {str(path)!r}: {exc.strerror or exc}") from None
    with stream:
        for number, raw in enumerate(stream, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                    "save the file as UTF-8"
                ) from None
            if "\x00" in text:
                raise InputError(f"{path}:{number}: holds a NUL byte: this is not a text file")
            yield number, text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json_line(text: str, where: str) -> Any:
    """One strict-JSON value (no NaN/Infinity), or an InputError that says why not."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a prompt record") from None
    except ValueError as exc:  # NaN/Infinity, or an integer past Python's digit limit
        reason = "a number is too large" if "digits" in str(exc) else str(exc)
        raise InputError(f"{where}: not valid JSON ({reason})") from None


def _read_txt(path: Path) -> Iterator[PromptItem]:
    for number, text in text_lines(path):
        if text.strip():
            yield PromptItem(
                f"{number:0{ID_WIDTH}d}", text.strip(), number, where=f"{path}:{number}"
            )


def _read_jsonl(path: Path) -> Iterator[PromptItem]:
    for number, text in text_lines(path):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        record = parse_json_line(text, where)
        if not isinstance(record, dict):
            raise InputError(f"{where}: each line must be a JSON object with a 'prompt'")
        yield _item(record, number, where)


def _numbers(record: dict[str, str]) -> dict[str, Any]:
    """CSV cells are text: turn the numeric settings into numbers (or leave them to fail)."""
    converted: dict[str, Any] = dict(record)
    for key, setting in BY_KEY.items():
        value = converted.get(key)
        if value in (None, "") or not setting.number:
            continue
        if setting.kind == "int" and re.fullmatch(r"-?\d{1,30}", value.strip()):
            converted[key] = int(value)
        elif setting.kind == "float":
            try:
                converted[key] = float(value)
            except ValueError:
                pass
    return converted


EXTRA_CELLS = "\x00extra"  # DictReader's key for cells beyond the header (no header can hold it)


def _read_csv(path: Path) -> Iterator[PromptItem]:
    reader = csv.DictReader((text for _, text in text_lines(path)), restkey=EXTRA_CELLS)
    try:
        fieldnames = reader.fieldnames
    except csv.Error as exc:
        raise InputError(f"{path}:1: not a readable CSV header ({exc})") from None
    if not fieldnames or "prompt" not in [name.strip() for name in fieldnames]:
        raise InputError(f"{path}: a CSV file needs a header row with a 'prompt' column")
    reader.fieldnames = [name.strip() for name in fieldnames]
    try:
        for number, row in enumerate(reader, start=1):
            where = f"{path}:{reader.line_num}"  # the file's line (a quoted cell may span lines)
            if EXTRA_CELLS in row:
                raise InputError(
                    f"{where}: {len(fieldnames) + len(row[EXTRA_CELLS])} cells, but the header "
                    f"has {len(fieldnames)} columns"
                )
            if not (row.get("id") or "").strip():
                row.pop("id", None)  # an empty id cell is no id: the item takes its line number
            yield _item(_numbers(row), number, where)
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}


def iter_items(
    prompts_file: str | None, prompts: tuple[str, ...] | list[str] = ()
) -> Iterator[PromptItem]:
    """The work items in order, read lazily (ids are not checked for repeats here: see
    :func:`read_items`, or the job's streaming check)."""
    if prompts_file and prompts:
        raise InputError("give --prompts FILE or --prompt TEXT, not both")
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"prompt file {prompts_file!r} does not exist")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise InputError(f"prompt file {prompts_file!r}: use .txt, .jsonl or .csv")
        return reader(path)
    return (
        PromptItem(f"{n:0{ID_WIDTH}d}", text, n, where=f"--prompt #{n}")
        for n, text in enumerate(prompts, start=1)
        if text.strip()
    )


def check_unique(items: Iterable[PromptItem], source: str) -> list[PromptItem]:
    """``items`` as a list; a repeated id (it names the image file) is an InputError."""
    seen: dict[str, int] = {}
    listed = []
    for item in items:
        if item.id in seen:
            raise InputError(f"{source}:{item.line}: id {item.id!r} repeats line {seen[item.id]}")
        seen[item.id] = item.line
        listed.append(item)
    return listed


def read_items(
    prompts_file: str | None, prompts: tuple[str, ...] | list[str] = ()
) -> list[PromptItem]:
    """The work items, in order, as a list (for small inputs; jobs stream): ids are unique."""
    source = str(Path(prompts_file)) if prompts_file else "--prompt"
    items = check_unique(iter_items(prompts_file, prompts), source)
    if not items:
        raise InputError(f"no prompts in {source}")
    return items
