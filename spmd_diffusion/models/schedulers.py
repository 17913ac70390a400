"""Choosing the pipeline's scheduler: any diffusers scheduler class, built ``from_config`` of
the pipeline's own scheduler config (so the model's betas and timestep settings carry over),
with options that override that config.

Names and options are checked on rank 0 before loading: ``from_config`` only warns about a
key it does not know, and a misspelt option silently doing nothing would be worse than an
error.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (diffusers)

from __future__ import annotations

import inspect
import json
from typing import Any


def scheduler_class(name: str) -> Any:
    """The diffusers scheduler class ``name`` (e.g. ``EulerDiscreteScheduler``)."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(
            f"scheduler {name!r} is not a diffusers scheduler class (e.g. EulerDiscreteScheduler, "
            "DPMSolverMultistepScheduler, UniPCMultistepScheduler)"
        )
    return cls


def parse_scheduler_option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON (``true``, ``2``, ``"karras"``, ``[1, 2]``)
    and, when it is no JSON, taken as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise ValueError(f"a scheduler option is key=value, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def check_scheduler(name: str, options: dict[str, Any]) -> None:
    """The class exists and takes every option."""
    cls = scheduler_class(name)
    accepted = {param for param in inspect.signature(cls.__init__).parameters if param != "self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"{name} takes no option {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}"
        )


def set_scheduler(pipeline: Any, name: str, options: dict[str, Any]) -> None:
    """Replace the pipeline's scheduler with ``name`` built from its config plus ``options``."""
    check_scheduler(name, options)
    pipeline.scheduler = scheduler_class(name).from_config(pipeline.scheduler.config, **options)
