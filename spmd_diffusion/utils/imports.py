"""Objects named by dotted path: how executors, hooks and schedule policies are given as text."""

from __future__ import annotations

import importlib
from typing import Any


def import_by_path(path: str) -> Any:
    """Import ``package.module.Name`` or ``package.module:Name``."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not a dotted path to an object")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
