"""Columnar inputs: parquet files and Hugging Face ``datasets``, read in record batches.

The schema is checked when the source is opened (before any model loads): the prompt
column must exist and hold text, the id column text or integers, the setting columns
(``seed``, ``steps``, ``guidance``, ``height``, ``width``, ``negative_prompt``, same names as
in a .jsonl file) numbers or text as those need. Only the columns the job uses are read:
other text, number and boolean columns are kept in the manifest as ``meta``; others
(images, bytes, lists) are not read at all. Rows arrive ``BATCH_ROWS`` at a time, so a
table of millions of prompts costs rank 0 one record batch of memory.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (datasets, pyarrow)

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from spmd_diffusion.errors import InputError
from spmd_diffusion.jobs.prompts import SETTING_KEYS, PromptItem, _item
from spmd_diffusion.jobs.sources import Columns, ItemSource
from spmd_diffusion.request_settings import BY_KEY

BATCH_ROWS = 4096
# The column types a setting's kind may come in (a float setting may be an integer column).
COLUMN_KINDS = {
    "int": ("integer",),
    "float": ("integer", "number"),
    "text": ("text",),
    "path": ("text",),
}


def _kind(arrow_type: Any) -> str:
    """text, integer, number, boolean or other."""
    import pyarrow.types as t

    if t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_string_view(arrow_type):
        return "text"
    if t.is_integer(arrow_type):
        return "integer"
    if t.is_floating(arrow_type) or t.is_decimal(arrow_type):
        return "number"
    if t.is_boolean(arrow_type):
        return "boolean"
    if t.is_null(arrow_type):
        return "null"
    return "other"


def plan_columns(schema: Any, columns: Columns, where: str) -> dict[str, str]:
    """Input column -> record key, for every column the job reads; a missing prompt/id
    column or one of the wrong type is an InputError naming the columns there are."""
    kinds = {name: _kind(schema.field(name).type) for name in schema.names}
    available = ", ".join(schema.names) or "none"

    def need(name: str, what: str, allowed: tuple[str, ...]) -> None:
        if name not in kinds:
            raise InputError(
                f"{where}: no column {name!r} for the {what} (columns: {available}); "
                f"name it with --{what}-column"
            )
        if kinds[name] not in (*allowed, "null"):
            raise InputError(
                f"{where}: column {name!r} holds {schema.field(name).type}, but the {what} must be "
                f"{' or '.join(allowed)}"
            )

    need(columns.prompt, "prompt", ("text",))
    mapping = {columns.prompt: "prompt"}
    id_column = columns.id if columns.id is not None else ("id" if "id" in kinds else None)
    if id_column is not None:
        need(id_column, "id", ("text", "integer"))
        mapping[id_column] = "id"
    for key in SETTING_KEYS:
        if key in kinds and key not in mapping:
            allowed = COLUMN_KINDS[BY_KEY[key].kind]
            if kinds[key] not in (*allowed, "null"):
                raise InputError(
                    f"{where}: column {key!r} holds {schema.field(key).type}, but {key} must be "
                    f"{' or '.join(allowed)}"
                )
            mapping[key] = key
    for name, kind in kinds.items():
        if (
            name not in mapping
            and kind in ("text", "integer", "number", "boolean")
            and name not in ("prompt", "id")
        ):
            mapping[name] = name  # kept as metadata
    return mapping


def _items(batches: Iterator[Any], mapping: dict[str, str], where: str) -> Iterator[PromptItem]:
    """Items of arrow record batches, rows numbered from 1."""
    row = 0
    for batch in batches:
        for values in batch.to_pylist():
            row += 1
            record = {mapping[name]: value for name, value in values.items() if name in mapping}
            yield _item(record, row, f"{where}: row {row}")


def _guarded(open_batches: Callable[[], Iterator[Any]], where: str) -> Iterator[Any]:
    """Record batches, with a read error (a corrupt page) turned into an InputError."""
    import pyarrow as pa

    try:
        yield from open_batches()
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{where}: cannot read: {exc}") from None


def parquet_source(path: Path, columns: Columns) -> ItemSource:
    """A parquet file, read ``BATCH_ROWS`` rows at a time (only the columns used)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = str(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{where}: not a readable parquet file ({exc})") from None
    mapping = plan_columns(schema, columns, where)

    def open_items() -> Iterator[PromptItem]:
        def batches() -> Iterator[Any]:
            with pq.ParquetFile(path) as table:
                yield from table.iter_batches(batch_size=BATCH_ROWS, columns=list(mapping))

        return _items(_guarded(batches, where), mapping, where)

    return ItemSource(where, open_items)


def _split(loaded: Any, columns: Columns, where: str) -> Any:
    """The one Dataset of a DatasetDict that ``--split`` names (default: train, or the only one)."""
    from datasets import DatasetDict

    if not isinstance(loaded, DatasetDict):
        if columns.split not in (None, getattr(loaded, "split", None)) and columns.split != "train":
            raise InputError(
                f"{where}: holds one dataset, not splits; drop --split {columns.split}"
            )
        return loaded
    names = list(loaded)
    split = columns.split or ("train" if "train" in loaded or len(names) != 1 else names[0])
    if split not in loaded:
        raise InputError(
            f"{where}: no split {split!r} (splits: {', '.join(names)}); choose one with --split"
        )
    return loaded[split]


def _dataset_source(dataset: Any, columns: Columns, where: str) -> ItemSource:
    mapping = plan_columns(dataset.data.schema, columns, where)
    selected = dataset.select_columns(list(mapping)).with_format("arrow")

    def open_items() -> Iterator[PromptItem]:
        return _items(_guarded(lambda: selected.iter(batch_size=BATCH_ROWS), where), mapping, where)

    return ItemSource(where, open_items)


def dataset_dir_source(path: Path, columns: Columns) -> ItemSource:
    """A dataset saved with ``save_to_disk`` (memory-mapped arrow files; rows read in batches)."""
    where = str(path)
    try:
        from datasets import load_from_disk
    except ImportError:
        raise InputError(
            f"{where}: reading a datasets directory needs the 'datasets' package "
            "(pip install 'spmd_diffusion[datasets]')"
        ) from None
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise InputError(f"{where}: not a dataset saved with save_to_disk ({exc})") from None
    return _dataset_source(_split(loaded, columns, where), columns, where)


def hub_dataset_source(name: str, columns: Columns) -> ItemSource:
    """A hub dataset by id (``hf:owner/name``), through ``datasets.load_dataset`` and its cache."""
    where = f"hf:{name}"
    try:
        from datasets import load_dataset
    except ImportError:
        raise InputError(
            f"{where}: reading a hub dataset needs the 'datasets' package "
            "(pip install 'spmd_diffusion[datasets]')"
        ) from None
    try:
        loaded = load_dataset(name, split=columns.split or "train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not found/not cached"
        raise InputError(
            f"{where}: cannot load the dataset ({type(exc).__name__}: {exc})"
        ) from None
    return _dataset_source(loaded, columns, where)
