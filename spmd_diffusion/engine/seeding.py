"""Seeds fixed by the engine, never by the rank.

An item's seed is its own, or a hash of the run seed and the item's id: the same item gets
the same seed (and so the same image) whatever the world size, batch or replica it lands in.
"""

from __future__ import annotations

import dataclasses
import hashlib

from spmd_diffusion.request import MAX_SEED, OmniDiffusionRequest


def derive_seed(run_seed: int, item_id: str) -> int:
    """A stable 63-bit seed from the run seed and an item id (no Python hash randomization)."""
    digest = hashlib.blake2b(f"{run_seed}:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_SEED


def with_seed(request: OmniDiffusionRequest, run_seed: int) -> OmniDiffusionRequest:
    """The request itself if it has a seed, else a copy with its derived seed."""
    if request.seed is not None:
        return request
    return dataclasses.replace(request, seed=derive_seed(run_seed, request.request_id))
