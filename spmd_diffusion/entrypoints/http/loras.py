"""Per-request LoRA on the server: adapters a client may name, from the operator's allow-list.

A client names adapters (``"lora": "style"`` or ``["style:0.8", "detail"]``: NAME[:SCALE]);
the server maps each name to the path the operator gave (``--lora NAME=PATH``, or every
adapter in ``--lora-dir DIR``, named by its file or directory stem). A client never gives a
path or a hub id: the server reads no file and fetches nothing a client chooses. Workers load
adapters on first use and keep at most ``--max-loras`` per replica (least recently used
evicted); requests with different adapter sets never share a batch. Outputs name the
adapters by their catalog names, never by the server's paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from spmd_diffusion.models.lora import WEIGHT_SUFFIXES, parse_loras

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def split_lora_options(values: list[str]) -> tuple[list[str], dict[str, str]]:
    """``--lora`` values as (the run's own adapters, PATH_OR_ID[:SCALE]; the catalog, NAME=PATH)."""
    run: list[str] = []
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and NAME.match(name):
            if name in named:
                raise ValueError(f"--lora names {name!r} twice")
            named[name] = path
        else:
            run.append(value)
    return run, named


def lora_catalog(named: dict[str, str], directory: str | None) -> dict[str, str]:
    """Name -> absolute path of every adapter a client may ask for; each one checked now."""
    catalog: dict[str, str] = {}
    if directory is not None:
        root = Path(directory).expanduser()
        if not root.is_dir():
            raise ValueError(f"--lora-dir {directory!r} is not a directory")
        for entry in sorted(root.iterdir()):
            is_weights = entry.is_file() and entry.suffix.lower() in WEIGHT_SUFFIXES
            holds_weights = entry.is_dir() and any(
                child.suffix.lower() in WEIGHT_SUFFIXES for child in entry.iterdir()
            )
            name = entry.stem if entry.is_file() else entry.name
            if (is_weights or holds_weights) and NAME.match(name):
                catalog[name] = str(entry.resolve())
    for name, path in named.items():
        resolved = Path(path).expanduser()
        if not resolved.exists():
            raise ValueError(
                f"--lora {name}={path}: {path!r} does not exist (a served adapter is a local file "
                "or directory)"
            )
        catalog[name] = str(resolved.resolve())
    return catalog


def resolve_loras(value: Any, catalog: dict[str, str]) -> list[str] | None:
    """A client's ``lora`` (NAME[:SCALE], one or a list) as the worker's PATH:SCALE specs;
    ValueError naming what is offered for anything else."""
    if value is None:
        return None
    specs = parse_loras(value)
    unknown = [spec.source for spec in specs if spec.source not in catalog]
    if unknown:
        offered = (
            ", ".join(sorted(catalog)[:20])
            or "none (start the server with --lora NAME=PATH or --lora-dir)"
        )
        raise ValueError(
            f"unknown LoRA {', '.join(map(repr, unknown))}: a request names adapters this server "
            f"offers ({offered}), never a path"
        )
    return [f"{catalog[spec.source]}:{spec.scale:g}" for spec in specs]


def name_loras(metadata: list[dict[str, Any]], catalog: dict[str, str]) -> None:
    """Outputs name adapters by catalog name (and scale), not by the server's paths."""
    names = {path: name for name, path in catalog.items()}
    for record in metadata:
        if record.get("lora"):
            record["lora"] = [
                {
                    "name": names.get(entry.get("source"), Path(str(entry.get("source"))).name),
                    "scale": entry["scale"],
                }
                for entry in record["lora"]
            ]
