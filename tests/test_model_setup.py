"""The worker's model setup: the steps' order is checked in code, and their hooks compose."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from spmd_diffusion.models.hooks import hook_owner, remove_hook, wrap_forward
from spmd_diffusion.worker.model_setup import STEPS, Step, check_order


def test_the_steps_run_in_the_documented_order():
    # CFG's split wraps sequence parallel and TP, the cache's hooks sit inside it, compile last.
    assert [step.name for step in STEPS] == [
        *("load", "options", "lora", "place", "tp", "sp", "cfg", "vae", "cache"),
        *("batch_invariance", "compile"),
    ]


def test_a_step_out_of_order_is_refused():
    steps = list(STEPS)
    cfg = next(step for step in steps if step.name == "cfg")
    steps.remove(cfg)
    steps.insert(1, cfg)
    with pytest.raises(ValueError, match="'cfg' must come after sp"):
        check_order(steps)
    with pytest.raises(ValueError, match="listed twice"):
        check_order([*STEPS, Step("compile", lambda setup: None)])


class Scale:
    """A hook owner that scales the output of the forward it wraps."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def forward(self, inner, *args, **kwargs):
        return inner(*args, **kwargs) * self.factor


def test_hooks_compose_in_registration_order_and_come_off_by_name():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    expected = layer(x)
    signature = inspect.signature(layer.forward)
    wrap_forward(layer, "double", Scale(2.0))
    wrap_forward(layer, "plus", type("Plus", (), {"forward": lambda self, f, *a: f(*a) + 1})())
    assert torch.allclose(layer(x), expected * 2 + 1)  # the last registered runs outermost
    assert inspect.signature(layer.forward) == signature
    assert isinstance(hook_owner(layer, "double"), Scale) and hook_owner(layer, "none") is None
    with pytest.raises(RuntimeError, match="already enabled"):
        wrap_forward(layer, "double", Scale(3.0))
    assert remove_hook(layer, "double") and torch.allclose(layer(x), expected + 1)  # inner one
    wrap_forward(layer, "double", Scale(2.0))
    assert remove_hook(layer, "double") and torch.allclose(layer(x), expected + 1)  # outer one
    assert remove_hook(layer, "plus") and not remove_hook(layer, "plus")
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), expected)
