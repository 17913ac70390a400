"""TorchControl: the control plane over a torch.distributed gloo CPU group.

Used under torchrun, and under srun when MPI is not usable. Idle ranks block inside gloo
(a socket wait, not a spin). Rank 0 receives replies with ``irecv`` and waits with a
deadline, so every call can time out. The group has its own very long timeout: an idle
worker may wait hours for the next call, which must not count as a failure.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import sys
import time
from typing import Any

from spmd_diffusion.distributed.control.base import (
    SLOT_BYTES,
    ControlPlane,
    encode_slot,
    slot_length,
    slot_payload,
)
from spmd_diffusion.distributed.launcher import SLURM, LaunchInfo, first_slurm_host

IDLE_TIMEOUT = datetime.timedelta(days=30)



def slurm_rendezvous_defaults(env: dict[str, str] | os._Environ) -> None:
    """Under srun, derive MASTER_ADDR/MASTER_PORT from the step unless the user set them."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in env and nodelist:
        env["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = str(20000 + job % 20000)


def init_default_group(launch: LaunchInfo) -> None:
    """Join torch.distributed's default group (NCCL for CUDA tensors, gloo for CPU ones)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if launch.kind == SLURM:
        slurm_rendezvous_defaults(os.environ)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)


class TorchControl(ControlPlane):
    kind = "torch"

    def __init__(self, launch: LaunchInfo) -> None:
        import torch
        import torch.distributed as dist

        init_default_group(launch)
        self.dist, self.torch = dist, torch
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = launch.local_rank if launch.local_rank is not None else 0
        self.local_size = launch.local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        atexit.register(self.close)

    def close(self) -> None:
        """Leave the process group at a clean exit (torch warns when a group is leaked)."""
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def _bytes_tensor(self, data: bytes | bytearray) -> Any:
        return self.torch.frombuffer(bytearray(data), dtype=self.torch.uint8)

    def broadcast(self, obj: Any) -> None:
        slot, rest = encode_slot(obj)
        self.dist.broadcast(self._bytes_tensor(slot), src=0, group=self.group)
        if rest is not None:
            self.dist.broadcast(self._bytes_tensor(rest), src=0, group=self.group)

    def receive_broadcast(self) -> Any:
        slot = self.torch.zeros(SLOT_BYTES, dtype=self.torch.uint8)
        self.dist.broadcast(slot, src=0, group=self.group)
        raw = slot.numpy().tobytes()
        data = slot_payload(raw)
        if data is None:
            rest = self.torch.empty(slot_length(raw), dtype=self.torch.uint8)
            self.dist.broadcast(rest, src=0, group=self.group)
            data = rest.numpy().tobytes()
        return pickle.loads(data)

    def send_to_root(self, obj: Any) -> None:
        slot, rest = encode_slot(obj)
        self.dist.send(self._bytes_tensor(slot), dst=0, group=self.group)
        if rest is not None:
            self.dist.send(self._bytes_tensor(rest), dst=0, group=self.group)

    def _wait(self, work: Any, deadline: float | None) -> bool:
        if deadline is None:
            work.wait()
            return True
        remaining = max(0.001, deadline - time.monotonic())
        try:
            return work.wait(timeout=datetime.timedelta(seconds=remaining)) is not False
        except RuntimeError as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                return False
            raise

    def receive_from(self, ranks: list[int], deadline: float | None) -> dict[int, Any]:
        received: dict[int, Any] = {}
        for rank in sorted(ranks):
            slot = self.torch.zeros(SLOT_BYTES, dtype=self.torch.uint8)
            if not self._wait(self.dist.irecv(slot, src=rank, group=self.group), deadline):
                break
            raw = slot.numpy().tobytes()
            data = slot_payload(raw)
            if data is None:
                rest = self.torch.empty(slot_length(raw), dtype=self.torch.uint8)
                if not self._wait(self.dist.irecv(rest, src=rank, group=self.group), deadline):
                    break
                data = rest.numpy().tobytes()
            received[rank] = pickle.loads(data)
        return received

    def abort(self, code: int) -> None:
        """Exit at once; torchrun (or srun --kill-on-bad-exit) ends the other ranks, and
        ranks blocked in gloo see the closed connections and fail too."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

