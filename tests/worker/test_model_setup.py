"""The worker's model setup: the steps' order is checked in code, and their hooks compose."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from spmd_diffusion.models.hooks import hook_owner, remove_hook, wrap_forward
from spmd_diffusion.worker.batch_invariance import HOOK, make_batch_invariant
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


def test_batch_invariance_runs_rows_and_rebuilds_the_output():
    class Net(nn.Module):
        calls: list[int] = []

        def forward(self, sample, timestep, added=None, return_dict=True):
            self.calls.append(sample.shape[0])
            out = sample * 2 + added["bias"] + timestep.reshape(-1, 1)
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    net = Net()
    sample, bias = torch.randn(3, 4), torch.randn(3, 4)
    timestep = torch.tensor([1.0, 2.0, 3.0])
    expected = net(sample, timestep, added={"bias": bias}).sample
    assert make_batch_invariant(SimpleNamespace(transformer=net)) == ["transformer"]
    assert make_batch_invariant(SimpleNamespace(transformer=net)) == []  # once only
    Net.calls.clear()
    got = net(sample, timestep, added={"bias": bias})
    assert Net.calls == [1, 1, 1] and type(got) is Transformer2DModelOutput
    assert torch.equal(got.sample, expected)
    assert torch.equal(net(sample, timestep, {"bias": bias}, False)[0], expected)
    assert remove_hook(net, HOOK) and "forward" not in net.__dict__
