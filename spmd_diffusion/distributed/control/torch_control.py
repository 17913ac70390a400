"""TorchControl: the control plane over a torch.distributed gloo CPU group.

Used under torchrun, and under srun when MPI is not usable. Messages are a fixed slot,
followed by the rest when they do not fit (gloo must know a message's size to receive it).
Idle ranks block inside gloo (a socket wait, not a spin).

Rank 0 sends with ``isend``: a gloo send completes only once the receiver has posted its
receive (a blocking 1 KiB send to a busy rank returns only when that rank gets to it, seconds
later), and rank 0 must never wait for a busy rank. gloo's works do not report
completion unless waited on, so rank 0 keeps each rank's sends in order and retires them as
that rank's replies come back: every request gets exactly one reply, in order, so the k-th
reply of a rank means its k-th request has arrived. Replies are received by one thread
blocked in a receive from any rank (a gloo receive cannot be polled, and one that times out
breaks the connection), so they are taken in whatever order ranks finish. The group has
its own very long timeout: an idle worker may wait hours for the next call, which must not
count as a failure.
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import queue
import sys
import threading
from collections import deque
from collections.abc import Collection
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.distributed import netif
from spmd_diffusion.distributed.control.base import (
    SLOT_BYTES,
    ControlPlane,
    encode_slot,
    slot_length,
    slot_payload,
)
from spmd_diffusion.distributed.launcher import SLURM, TORCHRUN, LaunchInfo, first_slurm_host
from spmd_diffusion.errors import ConnectionLostError, LaunchError, gloo_brief

IDLE_TIMEOUT = datetime.timedelta(days=30)
TAG_REQUEST, TAG_REQUEST_REST, TAG_REPLY, TAG_REPLY_REST = 0, 1, 2, 3


def slurm_rendezvous_defaults(env: Any) -> None:
    """Under srun, derive MASTER_ADDR/MASTER_PORT from the step unless the user set them."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in env and nodelist:
        env["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in env:
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        env["MASTER_PORT"] = str(20000 + job % 20000)


def init_default_group(launch: LaunchInfo) -> None:
    """Join torch.distributed's default group (NCCL for CUDA tensors, gloo for CPU ones),
    within ``envs.init_timeout()`` (torch's own default is 30 minutes). Across nodes, gloo
    binds the interface that routes to MASTER_ADDR (not what this host's name resolves to,
    127.0.1.1 on Debian/Ubuntu) unless GLOO_SOCKET_IFNAME says otherwise."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    env = envs.environment()
    if launch.kind == SLURM:
        slurm_rendezvous_defaults(env)
    elif launch.kind != TORCHRUN and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise LaunchError(
            f"the torchrun executor needs torch.distributed's rendezvous, which {launch.kind} does "
            "not set up: start the job with torchrun or srun, set MASTER_ADDR and MASTER_PORT, "
            "or use the mpi executor"
        )
    one_node = launch.local_world_size == launch.world_size
    envs.keep_on_loopback(one_node)
    if not one_node:
        netif.gloo_interface_towards(None if launch.rank == 0 else env.get("MASTER_ADDR"))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=envs.init_timeout())
    try:
        dist.init_process_group(
            backend=backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
    except Exception as exc:  # noqa: BLE001 - torch's errors do not say where they tried to meet
        where = f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
        raise LaunchError(
            f"rank {launch.rank} could not join torch.distributed at {where} within "
            f"{timeout.total_seconds():g} s ({type(exc).__name__}: {_first_line(exc)}); "
            "set MASTER_ADDR to an address of rank 0's node that every node can reach, and "
            "GLOO_SOCKET_IFNAME to the interface that carries it"
        ) from exc


class TorchControl(ControlPlane):
    kind = "torch"

    def __init__(self, launch: LaunchInfo) -> None:
        import torch
        import torch.distributed as dist

        init_default_group(launch)
        self.dist, self.torch = dist, torch
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_rank = launch.local_rank if launch.local_rank is not None else 0
        self.local_size = launch.local_world_size or envs.local_world_size()
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.lock = threading.Lock()
        self._sending: dict[int, deque] = {}  # rank -> its requests' (works, tensors), in order
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._receiver: threading.Thread | None = None
        atexit.register(self.close)

    def close(self) -> None:
        """Leave the process group at a clean exit (torch warns when a group is leaked)."""
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def _tensor(self, data: bytes | bytearray) -> Any:
        return self.torch.frombuffer(bytearray(data), dtype=self.torch.uint8)

    def _slot(self) -> Any:
        return self.torch.zeros(SLOT_BYTES, dtype=self.torch.uint8)

    def _finish(self, slot: Any, source: int, rest_tag: int) -> Any:
        """Unpickle a message whose slot has arrived, receiving its rest first if it has one."""
        raw = slot.numpy().tobytes()
        data = slot_payload(raw)
        if data is None:
            rest = self.torch.empty(slot_length(raw), dtype=self.torch.uint8)
            self.dist.recv(rest, src=source, group=self.group, tag=rest_tag)
            data = rest.numpy().tobytes()
        return pickle.loads(data)

    # -- rank 0 ------------------------------------------------------------------------------
    def send(self, rank: int, obj: Any) -> None:
        slot, rest = encode_slot(obj)
        parts = [(self._tensor(slot), TAG_REQUEST)] + (
            [(self._tensor(rest), TAG_REQUEST_REST)] if rest else []
        )
        with self.lock:
            if self._receiver is None:
                self._receiver = threading.Thread(
                    target=self._receive_replies, name="spmd-diffusion-replies", daemon=True
                )
                self._receiver.start()
            try:
                works = [
                    self.dist.isend(tensor, dst=rank, group=self.group, tag=tag)
                    for tensor, tag in parts
                ]
            except RuntimeError as exc:  # gloo: the pair to ``rank`` is closed (it died)
                raise ConnectionLostError(gloo_brief(exc), rank) from exc
            self._sending.setdefault(rank, deque()).append((works, parts))

    def _retire_oldest_send(self, rank: int) -> None:
        """``rank`` answered its oldest request, so that request has arrived."""
        with self.lock:
            pending = self._sending.get(rank)
            sent = pending.popleft() if pending else None
        if sent is not None:
            for work in sent[0]:
                work.wait()  # already complete: this only releases gloo's buffers

    def _receive_replies(self) -> None:
        """Rank 0's reply thread: every reply from any rank, as it arrives."""
        try:
            while True:
                slot = self._slot()
                source = self.dist.recv(slot, group=self.group, tag=TAG_REPLY)
                reply = self._finish(slot, source, TAG_REPLY_REST)
                self._retire_oldest_send(source)
                self._replies.put(reply)
        except Exception as exc:  # noqa: BLE001 - the group is gone (a rank died, or shutdown)
            self._replies.put(exc)

    def share_inbox(self, inbox: Any) -> bool:
        """Replies go straight into ``inbox`` (rank 0's own worker replies there too), so the
        engine blocks on one queue instead of polling: a polling thread holds the GIL that
        the reply thread needs, which tripled a call's cost (benchmarks/RESULTS.md,
        "Measurements behind design choices")."""
        with self.lock:
            self._replies = inbox
        return True

    def poll_replies(self, ranks: Collection[int]) -> list[Any]:
        arrived = []
        while True:
            try:
                item = self._replies.get_nowait()
            except queue.Empty:
                return arrived
            if isinstance(
                item, Exception
            ):  # gloo does not say which rank: with two, it is the other
                raise ConnectionLostError(gloo_brief(item), 1 if self.size == 2 else None) from item
            arrived.append(item)

    def flush(self, timeout: float) -> bool:
        """Wait until every send has been received (the ranks are draining their queues)."""
        with self.lock:
            works = [
                work for pending in self._sending.values() for works, _ in pending for work in works
            ]
        done = threading.Event()

        def wait_all() -> None:
            for work in works:
                work.wait()
            done.set()

        threading.Thread(target=wait_all, daemon=True).start()
        return done.wait(timeout)

    # -- every other rank --------------------------------------------------------------------
    def recv_from_root(self) -> Any:
        slot = self._slot()
        self.dist.recv(slot, src=0, group=self.group, tag=TAG_REQUEST)
        return self._finish(slot, 0, TAG_REQUEST_REST)

    def send_to_root(self, obj: Any) -> None:
        slot, rest = encode_slot(obj)
        self.dist.send(self._tensor(slot), dst=0, group=self.group, tag=TAG_REPLY)
        if rest is not None:
            self.dist.send(self._tensor(rest), dst=0, group=self.group, tag=TAG_REPLY_REST)

    def abort(self, code: int) -> None:
        """Exit at once; torchrun (or srun --kill-on-bad-exit) ends the other ranks, and
        ranks blocked in gloo see the closed connections and fail too."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
