"""CFG parallel: the unconditional and conditional halves of a guided step on two ranks.

diffusers pipelines with classifier-free guidance call the denoiser once per step on a
doubled batch, ``torch.cat([latents] * 2)``, with the prompt embeddings ``[uncond; cond]``
(and timestep, masks, ``added_cond_kwargs``, ... doubled alike). The wrapper installed here
sits on the denoiser's ``forward``: when the batch is doubled, cfg rank c keeps half c of
every batch-sized tensor (positional, keyword, nested in dicts/lists/tuples), runs the real
forward, all-gathers the outputs over the cfg group and rebuilds the full output (tuple or
diffusers output dataclass). The pipeline sees the same output as without the wrapper, so
its guidance math and its scheduler state are untouched, and identical on both ranks.

"Doubled" is recognised from the input itself: the latent batch splits into ``cfg`` equal
chunks (that is how every guided diffusers pipeline builds it). Any other call (guidance
off, odd batch) runs unchanged on every rank. Splitting is exact for any batch, since the
denoiser treats samples independently; ``any_even_batch=True`` splits every divisible
batch, which is correct but turns un-guided calls into data parallelism within the replica.

Both ranks of a cfg group must run the same pipeline call (same prompts, seeds, sizes):
the split decision and the all-gather are then the same on both, so neither waits alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

SAMPLE_KEYWORDS = ("sample", "hidden_states", "x", "latents")
_ATTRIBUTE = "_spmd_cfg_parallel"


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latent batch: the first positional tensor, else the usual keyword names."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for name in SAMPLE_KEYWORDS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return None


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on every tensor inside ``value`` (dicts, lists, tuples, diffusers outputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        items = {key: _map_tensors(item, fn) for key, item in value.items()}
        if type(value) is dict:
            return items
        try:  # diffusers BaseOutput (a dataclass over OrderedDict) and other dict subclasses
            return type(value)(**items)
        except TypeError:
            return type(value)(items)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_map_tensors(item, fn) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


@dataclass
class CFGParallel:
    """The installed wrapper; ``remove()`` restores the denoiser's own forward."""

    denoiser: nn.Module = field(repr=False)
    mesh: DeviceMesh
    any_even_batch: bool = False
    split_calls: int = 0  # forwards that ran on a half batch (for tests and logs)
    whole_calls: int = 0  # forwards that ran unchanged
    previous_forward: Any = field(default=None, repr=False)  # an instance-level forward we wrapped

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    def should_split(self, sample: torch.Tensor | None) -> bool:
        if self.size == 1 or sample is None or sample.ndim == 0:
            return False
        if sample.shape[0] == 0 or sample.shape[0] % self.size:
            return False
        if self.any_even_batch:
            return True
        chunks = sample.chunk(self.size, dim=0)
        return all(torch.equal(chunks[0], chunk) for chunk in chunks[1:])

    def _gather(self, local: torch.Tensor, batch: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        if local.ndim == 0 or local.shape[0] != batch // self.size:
            return local
        shard = DTensor.from_local(local.contiguous(), self.mesh, [Shard(0)], run_check=False)
        return shard.full_tensor()  # all-gather over the cfg group, in cfg-rank order

    def forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        sample = _first_tensor(args, kwargs)
        if not self.should_split(sample):
            self.whole_calls += 1
            return original(*args, **kwargs)
        batch, rank, size = sample.shape[0], self.rank, self.size

        def take(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.ndim == 0 or tensor.shape[0] != batch:
                return tensor
            return tensor.chunk(size, dim=0)[rank]

        output = original(*_map_tensors(args, take), **_map_tensors(kwargs, take))
        self.split_calls += 1
        return _map_tensors(output, lambda tensor: self._gather(tensor, batch))

    def remove(self) -> None:
        """Undo :func:`enable_cfg_parallel`."""
        if self.denoiser.__dict__.get(_ATTRIBUTE) is self:
            if self.previous_forward is None:
                del self.denoiser.__dict__["forward"]
            else:  # e.g. an offload hook's forward, installed before ours
                self.denoiser.__dict__["forward"] = self.previous_forward
            del self.denoiser.__dict__[_ATTRIBUTE]


def _as_mesh(cfg_group: DeviceMesh | ProcessGroup, denoiser: nn.Module) -> DeviceMesh:
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(cfg_group, DeviceMesh):
        if cfg_group.ndim != 1:
            raise ValueError(f"the cfg mesh must be 1-D (mesh['cfg']), got a {cfg_group.ndim}-D mesh")
        return cfg_group
    device = next(denoiser.parameters()).device
    return DeviceMesh.from_group(cfg_group, device.type)


def enable_cfg_parallel(
    denoiser: nn.Module, cfg_group: DeviceMesh | ProcessGroup, *, any_even_batch: bool = False
) -> CFGParallel:
    """Split guided (doubled-batch) calls of ``denoiser`` over ``cfg_group`` (``mesh["cfg"]``
    or a ProcessGroup of 2 ranks); returns the handle whose ``remove()`` undoes it."""
    if _ATTRIBUTE in denoiser.__dict__:
        raise RuntimeError(f"CFG parallel is already enabled on this {type(denoiser).__name__}")
    wrapper = CFGParallel(denoiser, _as_mesh(cfg_group, denoiser), any_even_batch=any_even_batch)
    wrapper.previous_forward = denoiser.__dict__.get("forward")
    original = denoiser.forward  # bound method of the class (or an earlier wrapper)

    @functools.wraps(original)  # keeps inspect.signature: pipelines read the forward's parameters
    def forward(*args: Any, **kwargs: Any) -> Any:
        return wrapper.forward(original, *args, **kwargs)

    denoiser.__dict__["forward"] = forward
    denoiser.__dict__[_ATTRIBUTE] = wrapper
    return wrapper


def disable_cfg_parallel(denoiser: nn.Module) -> bool:
    """Remove CFG parallel from ``denoiser``; False when it was not enabled."""
    wrapper = denoiser.__dict__.get(_ATTRIBUTE)
    if wrapper is None:
        return False
    wrapper.remove()
    return True


def cfg_parallel_of(denoiser: nn.Module) -> CFGParallel | None:
    """The wrapper installed on ``denoiser``, if any."""
    return denoiser.__dict__.get(_ATTRIBUTE)
