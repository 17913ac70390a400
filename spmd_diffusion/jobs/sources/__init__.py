"""Where a batch job's items come from, read lazily.

``--prompts`` names the input; its kind is told by its name:

- ``.txt`` / ``.jsonl`` / ``.csv``: prompt files (:mod:`spmd_diffusion.jobs.prompts`); a
  ``.jsonl`` whose first record has ``custom_id`` and ``body`` is an OpenAI batch file
  (:mod:`.openai_batch`);
- ``.parquet``: a parquet file, read a row group at a time with pyarrow (:mod:`.tables`);
- a directory: a Hugging Face ``datasets`` dataset saved with ``save_to_disk``;
- ``hf:NAME``: a dataset on the Hugging Face hub, loaded with ``datasets.load_dataset``
  (from its cache when ``HF_DATASETS_OFFLINE=1``).

Every source is re-iterable (each pass reopens the input): rank 0 reads it once to check it
and count the work before any model loads, and once more while the job runs, handing
batches to replicas as they free up. Neither pass holds the whole list.
"""

# ruff: noqa: PLC0415 - project modules load where used (jobs.prompts, jobs.sources.openai_batch,
# jobs.sources.tables): they pull in heavy modules or import back into this one

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spmd_diffusion.errors import InputError
from spmd_diffusion.jobs.prompts import PromptItem, iter_items

HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the prompt and the id (tables and datasets), and the split."""

    prompt: str = "prompt"
    id: str | None = None  # None: an "id" column if there is one, else the row number
    split: str | None = None  # datasets: None means "train", or the only split


@dataclass
class ItemSource:
    """A re-iterable stream of items; ``name`` is what error messages call it."""

    name: str
    open: Callable[[], Iterator[PromptItem]] = field(repr=False)

    def __iter__(self) -> Iterator[PromptItem]:
        return self.open()


def is_openai_batch(path: Path) -> bool:
    """True when the first non-blank line of a .jsonl file is an OpenAI batch request."""
    from spmd_diffusion.jobs.prompts import parse_json_line, text_lines

    for number, text in text_lines(path):
        if text.strip():
            record = parse_json_line(text, f"{path}:{number}")
            return isinstance(record, dict) and "custom_id" in record and "body" in record
    return False


def open_source(
    prompts_file: str | None,
    prompts: tuple[str, ...] | list[str] = (),
    columns: Columns = Columns(),
) -> ItemSource:
    """The source ``--prompts`` / ``--prompt`` name; a missing or unknown input is an
    InputError (raised here, or on the first read)."""
    if prompts_file and prompts:
        raise InputError("give --prompts FILE or --prompt TEXT, not both")
    if not prompts_file and not prompts:
        raise InputError(
            "nothing to generate: give --prompts FILE (txt, jsonl, csv, parquet, a datasets "
            "directory or hf:NAME) or --prompt TEXT (repeatable)"
        )
    if not prompts_file:
        return ItemSource("--prompt", lambda: iter_items(None, prompts))
    if prompts_file.startswith(HUB_PREFIX):
        from spmd_diffusion.jobs.sources.tables import hub_dataset_source

        return hub_dataset_source(prompts_file[len(HUB_PREFIX) :], columns)
    path = Path(prompts_file)
    if path.is_dir():
        from spmd_diffusion.jobs.sources.tables import dataset_dir_source

        return dataset_dir_source(path, columns)
    if not path.is_file():
        raise InputError(f"prompt file {prompts_file!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from spmd_diffusion.jobs.sources.tables import parquet_source

        return parquet_source(path, columns)
    if suffix == ".jsonl" and is_openai_batch(path):
        from spmd_diffusion.jobs.sources.openai_batch import read_openai_batch

        return ItemSource(str(path), lambda: read_openai_batch(path))
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InputError(
            f"prompt file {prompts_file!r}: use .txt, .jsonl, .csv, .parquet, a datasets "
            "directory or hf:NAME"
        )
    return ItemSource(str(path), lambda: iter_items(prompts_file))
