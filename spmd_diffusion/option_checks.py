"""Checks the config and request types take from the layer that owns the option.

``data.py`` and ``request.py`` sit at the bottom of the layers, yet a LoRA spec, a step-cache
spec or a quantization kind is defined by ``models/``. Rather than import upward, they call
:func:`check` by the option's name, and the owner hands its check in with :func:`register`
(``spmd_diffusion.models.spec_checks``, registered when the package is imported).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CHECKS: dict[str, Callable[[Any], Any]] = {}


def register(**checks: Callable[[Any], Any]) -> None:
    """Hand in the check of each named option (the last registration of a name wins)."""
    CHECKS.update(checks)


def check(name: str, value: Any) -> Any:
    """``value`` checked by its owner: its normalised form, or a ValueError naming it."""
    try:
        owner = CHECKS[name]
    except KeyError:
        raise RuntimeError(
            f"no check registered for {name!r}: import spmd_diffusion (the package) first"
        ) from None
    return owner(value)
