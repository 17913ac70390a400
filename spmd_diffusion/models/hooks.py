"""The one way this tool patches a model's forward: diffusers' ``ModelHook`` / ``HookRegistry``.

CFG parallel, batch invariance, the tensor-parallel Linears and the step cache's timestep
probe all wrap a module's forward; diffusers' step caches and context parallel (sequence
parallel) do too. Going through one registry per module lets them compose: each hook wraps
the forward as it was when the hook was registered (the last one registered runs
outermost), any of them can be removed by name without unwinding the others, and the
pipeline's introspection of ``forward`` (its signature) keeps working.

:func:`wrap_forward` installs an *owner*, any object with
``forward(inner, *args, **kwargs)`` that calls ``inner`` (the forward it wraps) as it likes.
"""

# ruff: noqa: PLC0415 - diffusers is imported on first use: importing this module stays light

from __future__ import annotations

import functools
from typing import Any, Protocol


class ForwardOwner(Protocol):
    """What :func:`wrap_forward` runs in place of a module's forward."""

    def forward(self, inner: Any, *args: Any, **kwargs: Any) -> Any: ...


@functools.cache
def _forward_hook_class() -> type:
    from diffusers.hooks import ModelHook

    class ForwardHook(ModelHook):
        """A diffusers hook whose ``new_forward`` hands the wrapped forward to its owner."""

        _is_stateful = False

        def __init__(self, owner: ForwardOwner) -> None:
            super().__init__()
            self.owner = owner

        def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
            return self.owner.forward(self.fn_ref.original_forward, *args, **kwargs)

    return ForwardHook


def wrap_forward(module: Any, name: str, owner: ForwardOwner) -> None:
    """Run ``owner.forward(inner, ...)`` in place of ``module``'s forward, outside every hook
    registered before; RuntimeError when a hook of that name is already there."""
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not None:
        raise RuntimeError(f"{name} is already enabled on this {type(module).__name__}")
    registry.register_hook(_forward_hook_class()(owner), name)


def add_hook(module: Any, hook: Any, name: str) -> None:
    """Register a diffusers ``ModelHook`` on ``module`` (the registry made when missing)."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def hook_owner(module: Any, name: str) -> Any:
    """The owner :func:`wrap_forward` installed under ``name`` on ``module``, else None."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(name) if registry is not None else None
    return getattr(hook, "owner", None)


def remove_hook(module: Any, name: str) -> bool:
    """Remove the hook ``name`` from ``module`` alone; False when it had none. Once no hook is
    left, the class's own forward runs again (no instance-level ``forward`` stays behind)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return False
    index = registry._hook_order.index(name)
    outer = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    new_forward = outer.forward if outer is not None and outer.original_forward else None
    registry.remove_hook(name, recurse=False)
    if new_forward is not None:
        # diffusers re-points the outer hook's ``forward``; one with a ``new_forward`` calls
        # ``original_forward`` instead, so that is the one to re-point.
        outer.original_forward, outer.forward = outer.forward, new_forward
    forward = module.__dict__.get("forward")
    if not registry.hooks and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]
    return True
