"""Multi-node plumbing without a cluster: the rendezvous address, gloo's interface, stale
MPICH segments of a requeued Slurm job, and what run.json says after a killed run."""

from __future__ import annotations

import json
import socket
import time

import pytest

from spmd_diffusion.distributed import netif
from spmd_diffusion.distributed.mpich_shm import job_segments, remove_job_segments, world_id
from spmd_diffusion.distributed.protocol import RpcReply, failure_from_exception
from spmd_diffusion.distributed.rendezvous import reach, store_addresses
from spmd_diffusion.distributed.transport import Transport
from spmd_diffusion.errors import WorkerError
from spmd_diffusion.executor import rpc_executor
from spmd_diffusion.executor.rpc_executor import RpcExecutor
from spmd_diffusion.jobs.generate import previous_run


def test_node_addresses_are_never_loopback():
    assert all(not netif.is_loopback(address) for address in netif.node_addresses())
    assert "lo" in netif.interface_addresses()


def test_store_is_offered_at_master_addr_or_at_every_node_address(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "head.example")
    assert store_addresses() == ("head.example",)
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setattr(netif, "node_addresses", lambda: ["10.0.0.1", "192.168.1.1"])
    assert store_addresses() == ("10.0.0.1", "192.168.1.1")
    monkeypatch.setattr(netif, "node_addresses", lambda: [])
    with pytest.raises(ConnectionError, match="set MASTER_ADDR"):
        store_addresses()


def test_reach_takes_the_first_address_that_answers():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        host, local = reach(
            ("name-that-does-not-resolve.invalid", "127.0.0.1"), port, rank=1, timeout=5
        )
    assert (host, local) == ("127.0.0.1", "127.0.0.1")


def test_an_unreachable_store_fails_fast_naming_the_address():
    started = time.monotonic()
    with pytest.raises(ConnectionError) as failure:
        reach(("rank0-short-name.invalid",), 29999, rank=3, timeout=1)
    assert time.monotonic() - started < 10
    message = str(failure.value)
    assert (
        "rank 3" in message
        and "rank0-short-name.invalid:29999" in message
        and "MASTER_ADDR" in message
    )


def test_gloo_interface_follows_the_route_unless_the_user_chose(monkeypatch):
    monkeypatch.setenv(
        "GLOO_SOCKET_IFNAME", ""
    )  # restored (to unset) after the test: the code sets it
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setattr(
        netif, "interface_addresses", lambda: {"lo": "127.0.0.1", "eth7": "10.1.2.3"}
    )
    assert netif.use_interface_for_gloo("127.0.1.1") is None  # loopback: never chosen
    assert netif.use_interface_for_gloo("10.1.2.3") == "eth7"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    assert netif.use_interface_for_gloo("10.1.2.3") == "ib0"


def test_rank0_node_mapping_its_name_to_127_0_1_1_still_binds_a_real_interface(monkeypatch):
    """Debian's /etc/hosts: this node's name -> 127.0.1.1; gloo must not bind that."""
    monkeypatch.setenv(
        "GLOO_SOCKET_IFNAME", ""
    )  # restored (to unset) after the test: the code sets it
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setattr(
        netif, "interface_addresses", lambda: {"lo": "127.0.0.1", "veth0": "10.9.0.1"}
    )
    monkeypatch.setattr(netif, "resolve", lambda host: ["127.0.1.1"])
    assert netif.node_addresses() == ["10.9.0.1"]
    assert netif.gloo_interface_towards(None) == "veth0"


def test_mpich_world_id_matches_the_segment_a_slurm_step_leaves():
    assert (
        world_id("1.0") == "eb421bf2"
    )  # srun --mpi=pmi2, job 1 step 0: /dev/shm/mpich_shm_eb421bf2_0


def test_only_this_jobs_stale_segments_are_removed(tmp_path):
    mine = [
        tmp_path / f"mpich_shm_{world_id('4242.0')}_0",
        tmp_path / f"mpich_vci_{world_id('4242.3')}_1",
    ]
    others = [
        tmp_path / f"mpich_shm_{world_id('4243.0')}_0",
        tmp_path / "mpich_shm_other_0",
        tmp_path / "notes",
    ]
    for path in mine + others:
        path.write_bytes(b"x")
    assert sorted(job_segments("4242", tmp_path)) == sorted(mine)
    assert sorted(remove_job_segments("4242", tmp_path)) == sorted(mine)
    assert all(path.exists() for path in others) and not any(path.exists() for path in mine)


def test_a_run_json_left_running_is_reported_killed_on_resume(tmp_path):

    path = tmp_path / "run.json"
    assert previous_run(path) is None
    path.write_text(
        json.dumps({"status": "running", "started_at": "2026-01-01T00:00:00+0000", "totals": {}})
    )
    assert previous_run(path)["status"] == "killed"
    path.write_text(
        json.dumps({"status": "failed", "error": "WorkerDiedError: rank 1", "attempt": 2})
    )
    assert previous_run(path) == {
        "status": "failed",
        "error": "WorkerDiedError: rank 1",
        "attempt": 2,
        "started_at": None,
        "totals": None,
    }


def test_rank0s_own_load_failure_is_reported_at_once_not_after_startup_timeout(monkeypatch):
    """Rank 0's worker fails to load while rank 1 hangs (e.g. in a group rendezvous with
    rank 0): the error is rank 0's own, within the load grace, not rank 1's lateness."""

    class Rank0FailsRank1Hangs(Transport):
        world_size = 2

        def __init__(self):
            self.replies = []

        def send(self, rank, request):
            if rank == 0:
                error = RuntimeError("Gloo connectFullMesh failed")
                self.replies.append(
                    RpcReply(0, None, failure_from_exception(0, error), request.call_id)
                )

        def poll(self, ranks, timeout):
            replies, self.replies = self.replies, []
            if not replies and timeout:
                time.sleep(min(timeout, 0.05))
            return replies

    class Bare(RpcExecutor):
        def _init_executor(self):
            pass

    monkeypatch.setattr(rpc_executor, "LOAD_GRACE_S", 0.5)
    executor = Bare.__new__(Bare)
    executor.is_closed = executor.is_failed = False
    executor._open_calls()
    executor.transport = Rank0FailsRank1Hangs()
    started = time.monotonic()
    with pytest.raises(WorkerError) as failure:
        executor.start_workers((None, None), timeout=900)
    assert time.monotonic() - started < 5
    assert failure.value.ranks == [0] and "connectFullMesh" in str(failure.value)
