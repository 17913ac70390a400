"""CFG parallel: the unconditional and conditional halves of a guided step on two ranks.

Pipelines guide in one of two ways, and both are split here.

**Doubled batch** (SD 1.x/XL, PixArt, SD3, Sana, LTX): many diffusers pipelines with
classifier-free guidance call the denoiser once per step on a doubled batch,
``torch.cat([latents] * 2)``, with the prompt embeddings ``[uncond; cond]`` (and timestep,
masks, ``added_cond_kwargs``, ... doubled alike). The hook installed here (a diffusers
``ModelHook``, :mod:`spmd_diffusion.models.hooks`, registered after the sequence-parallel
hooks so it runs outside them) wraps the denoiser's forward: when the batch is doubled, cfg
rank c keeps half c of every batch-sized tensor (positional, keyword, nested in
dicts/lists/tuples: torch's pytree), runs the forward it wraps, all-gathers the outputs over
the cfg group and rebuilds the full output (tuple or diffusers output dataclass). The
pipeline sees the same output as without the hook, so its guidance math and its scheduler
state are untouched, and identical on both ranks.

"Doubled" is recognised from the input itself: the latent batch splits into ``cfg`` equal
chunks (that is how every guided diffusers pipeline builds it). Any other call (guidance
off, odd batch) runs unchanged on every rank. Splitting is exact for any batch, since the
denoiser treats samples independently; ``any_even_batch=True`` splits every divisible
batch, which is correct but turns un-guided calls into data parallelism within the replica.

**One call per branch** (Qwen-Image's true CFG, Wan, Flux with true CFG, and any pipeline of
that shape): both calls of a step share the latents and the timestep and differ only in the
text conditioning, which is fixed for the whole loop. So :class:`BranchPairing` watches the
first step run whole and learns which arguments the second call changes; from then on, at a
step's first call the pair's rank 0 runs that call and rank 1 the predicted second call, and
they exchange outputs. The second call is answered from the exchange only when its
arguments equal the prediction exactly (tensor equality), else it runs whole and is counted
so: correct by construction, for pipelines nobody wrote a plan for. The pairing is reset
before every pipeline call (:meth:`CFGParallel.reset`).

Both ranks of a cfg group must run the same pipeline call (same prompts, seeds, sizes):
the split decision and the all-gather are then the same on both, so neither waits alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.utils import _pytree as pytree

from spmd_diffusion.models.hooks import hook_owner, remove_hook, wrap_forward

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SAMPLE_KEYWORDS = ("sample", "hidden_states", "x", "latents")
TIMESTEP_KEYWORDS = ("timestep", "t", "timesteps")
HOOK = "spmd_cfg_parallel"


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latent batch: the first positional tensor, else the usual keyword names."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for name in SAMPLE_KEYWORDS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return None


def _same_leaf(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.shape == second.shape
            and first.dtype == second.dtype
            and first.device == second.device
            and torch.equal(first, second)
        )
    try:
        return bool(first == second)
    except Exception:  # noqa: BLE001 - objects without a plain equality
        return first is second


def same(first: Any, second: Any) -> bool:
    """Exact equality of call arguments: the same tree (torch's pytree: containers, their
    types and keys) and equal leaves (tensors: same shape, dtype, device and values). A
    call's own arguments (:func:`_call`) compare by name, whatever their order."""
    if type(first) is dict and type(second) is dict:
        return first.keys() == second.keys() and all(same(first[k], second[k]) for k in first)
    first_leaves, first_spec = pytree.tree_flatten(first)
    second_leaves, second_spec = pytree.tree_flatten(second)
    return first_spec == second_spec and all(map(_same_leaf, first_leaves, second_leaves))


def _call(args: tuple, kwargs: dict) -> dict[Any, Any]:
    """A call's arguments by position and name, in one dict."""
    return {**dict(enumerate(args)), **kwargs}


def _split_call(call: dict[Any, Any]) -> tuple[tuple, dict]:
    positions = sorted(key for key in call if isinstance(key, int))
    return tuple(call[i] for i in positions), {
        k: v for k, v in call.items() if not isinstance(k, int)
    }


@dataclass
class BranchPairing:
    """Learns, then predicts, the second (other-branch) denoiser call of each step."""

    first: dict[Any, Any] | None = None  # the call that opened the step being learned
    branch: dict[Any, Any] | None = None  # the arguments the second call of a step changes
    expected: dict[Any, Any] | None = None  # the predicted second call of the current step
    answer: Any = None  # its output, from the pair's exchange

    def reset(self) -> None:
        self.first = self.branch = self.expected = self.answer = None

    @staticmethod
    def differing(first: dict[Any, Any], second: dict[Any, Any]) -> dict[Any, Any] | None:
        """The arguments ``second`` changes, when the two calls are the branches of one step:
        the same latents and timestep, some tensor conditioning different."""
        if first.keys() != second.keys():
            return None
        sample_keys = [key for key in first if key in (0, *SAMPLE_KEYWORDS, *TIMESTEP_KEYWORDS)]
        if not any(isinstance(first[key], torch.Tensor) for key in sample_keys):
            return None
        if not all(same(first[key], second[key]) for key in sample_keys):
            return None
        changed = {key: second[key] for key in first if not same(first[key], second[key])}
        if not changed or not all(
            isinstance(value, torch.Tensor) or value is None for value in changed.values()
        ):
            return None
        return changed

    def predict(self, call: dict[Any, Any]) -> dict[Any, Any] | None:
        """The second call of the step ``call`` opens, or None while nothing is learned."""
        if self.branch is None or not all(key in call for key in self.branch):
            return None
        return {**call, **self.branch}


@dataclass
class CFGParallel:
    """What the CFG hook runs around the denoiser's forward; ``remove()`` takes the hook off."""

    denoiser: nn.Module = field(repr=False)
    mesh: DeviceMesh
    any_even_batch: bool = False
    split_calls: int = 0  # forwards that ran split over the pair: half a batch, or one branch each
    whole_calls: int = 0  # forwards that ran unchanged on both ranks
    pairing: BranchPairing = field(default_factory=BranchPairing, repr=False)

    def reset(self) -> None:
        """Forget the branch pairing: a new pipeline call has new conditioning."""
        self.pairing.reset()

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
        if local.ndim == 0 or local.shape[0] != batch // self.size:
            return local
        shard = DTensor.from_local(local.contiguous(), self.mesh, [Shard(0)], run_check=False)
        return shard.full_tensor()  # all-gather over the cfg group, in cfg-rank order

    def forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        sample = _first_tensor(args, kwargs)
        if not self.should_split(sample):
            return self._branches(original, args, kwargs)
        self.pairing.reset()  # a doubled-batch pipeline: no branch calls to pair
        batch, rank, size = sample.shape[0], self.rank, self.size

        def take(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.ndim == 0 or tensor.shape[0] != batch:
                return tensor
            return tensor.chunk(size, dim=0)[rank]

        args, kwargs = pytree.tree_map_only(torch.Tensor, take, (args, kwargs))
        output = original(*args, **kwargs)
        self.split_calls += 1
        return pytree.tree_map_only(
            torch.Tensor, lambda tensor: self._gather(tensor, batch), output
        )

    def _branches(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A call that is not a doubled batch: answer it from the exchange when it is the
        predicted second branch, split it with its predicted partner when it opens a step,
        else run it whole (and learn from it)."""
        pairing, call = self.pairing, _call(args, kwargs)
        if pairing.expected is not None:
            expected, answer = pairing.expected, pairing.answer
            pairing.expected = pairing.answer = None
            if same(call, expected):
                self.split_calls += 1
                return answer
            pairing.branch = None  # the prediction failed: learn again
        partner = pairing.predict(call) if self.size == 2 else None
        if partner is None:
            self.whole_calls += 1
            if pairing.first is not None and pairing.branch is None:
                pairing.branch = pairing.differing(pairing.first, call)
            pairing.first = None if pairing.branch is not None else call
            return original(*args, **kwargs)
        mine = call if self.rank == 0 else partner
        output = original(*_split_call(mine)[0], **_split_call(mine)[1])
        first, second = self._exchange(output)
        pairing.expected, pairing.answer = partner, second
        self.split_calls += 1
        return first

    def _exchange(self, output: Any) -> tuple[Any, Any]:
        """(rank 0's output, rank 1's output) on both ranks: every tensor all-gathered."""
        leaves, spec = pytree.tree_flatten(output)
        firsts, seconds = [], []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                pair = self._gather_pair(leaf)
                firsts.append(pair[0])
                seconds.append(pair[1])
            else:
                firsts.append(leaf)
                seconds.append(leaf)
        return pytree.tree_unflatten(firsts, spec), pytree.tree_unflatten(seconds, spec)

    def _gather_pair(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard = DTensor.from_local(
            local.contiguous().unsqueeze(0), self.mesh, [Shard(0)], run_check=False
        )
        both = shard.full_tensor()
        return both[0], both[1]

    def remove(self) -> None:
        """Undo :func:`enable_cfg_parallel`."""
        if cfg_parallel_of(self.denoiser) is self:
            remove_hook(self.denoiser, HOOK)


def _as_mesh(cfg_group: DeviceMesh | ProcessGroup, denoiser: nn.Module) -> DeviceMesh:
    if isinstance(cfg_group, DeviceMesh):
        if cfg_group.ndim != 1:
            raise ValueError(
                f"the cfg mesh must be 1-D (mesh['cfg']), got a {cfg_group.ndim}-D mesh"
            )
        return cfg_group
    device = next(denoiser.parameters()).device
    return DeviceMesh.from_group(cfg_group, device.type)


def enable_cfg_parallel(
    denoiser: nn.Module, cfg_group: DeviceMesh | ProcessGroup, *, any_even_batch: bool = False
) -> CFGParallel:
    """Split guided (doubled-batch) calls of ``denoiser`` over ``cfg_group`` (``mesh["cfg"]``
    or a ProcessGroup of 2 ranks); returns the handle whose ``remove()`` undoes it. The hook
    wraps every hook already on the denoiser (context parallel's, when sequence parallel is
    on): enable it after them."""
    if cfg_parallel_of(denoiser) is not None:
        raise RuntimeError(f"CFG parallel is already enabled on this {type(denoiser).__name__}")
    wrapper = CFGParallel(denoiser, _as_mesh(cfg_group, denoiser), any_even_batch=any_even_batch)
    wrap_forward(denoiser, HOOK, wrapper)
    return wrapper


def disable_cfg_parallel(denoiser: nn.Module) -> bool:
    """Remove CFG parallel from ``denoiser``; False when it was not enabled."""
    return remove_hook(denoiser, HOOK)


def cfg_parallel_of(denoiser: nn.Module) -> CFGParallel | None:
    """The wrapper installed on ``denoiser``, if any."""
    return hook_owner(denoiser, HOOK)
