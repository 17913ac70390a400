"""What a stranger on the network can do to a job: nothing.

- A one-node job opens no listening socket of its own beyond loopback (MPI's own listener,
  which a plain mpi4py program opens too, is measured and allowed for).
- Pickles planted in every socket the job listens on are never run.
- The multi-node rendezvous store keeps every key under a per-job secret prefix.
- Work that goes missing (a lost batch) makes the run incomplete: exit 3, the missing ids
  named, never "complete".
"""

# ruff: noqa: PLC0415 - heavy modules load on first use (torch)

from __future__ import annotations

import ipaddress
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from gates import JobGate
from launch import BIN

from spmd_diffusion.distributed.rendezvous import RendezvousServer

pytestmark = [pytest.mark.launcher, pytest.mark.slow]

TESTS = Path(__file__).parents[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def own_listeners(process: psutil.Process) -> list[tuple[str, int]]:
    """Listening TCP sockets of ``process`` that it did not inherit from its launcher
    (hydra hands its PMI listener down to every rank)."""
    inherited = set()
    for ancestor in process.parents():
        try:
            inherited |= {
                c.laddr for c in ancestor.net_connections("inet") if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:
            pass
    return sorted(
        {
            (c.laddr.ip, c.laddr.port)
            for c in process.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr not in inherited
        }
    )


def beyond_loopback(listeners: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [
        (ip, port)
        for ip, port in listeners
        if not ipaddress.ip_address(ip.split("%")[0]).is_loopback
    ]


def rank_processes(launcher: subprocess.Popen, count: int, deadline: float) -> list[psutil.Process]:
    while time.monotonic() < deadline:
        ranks = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if "python" in p.name() or "omni-diffuse" in " ".join(p.cmdline())
        ]
        if len(ranks) >= count:
            return ranks
        time.sleep(0.2)
    raise AssertionError("the ranks did not start")


MPI_BASELINE = """
import os, sys, time
from mpi4py import MPI
MPI.COMM_WORLD.Barrier()  # MPI is up on every rank: its listeners exist
open(f"{sys.argv[1]}.ready{MPI.COMM_WORLD.rank}", "w").close()
while not os.path.exists(sys.argv[1]):  # until the test has counted them
    time.sleep(0.05)
MPI.COMM_WORLD.Barrier()
"""


@pytest.fixture(scope="module")
def mpi_listeners_per_rank(tmp_path_factory) -> int:
    """How many non-loopback listeners MPI itself gives a rank (a bare mpi4py program)."""
    folder = tmp_path_factory.mktemp("baseline")
    script, counted = folder / "baseline.py", folder / "counted"
    script.write_text(MPI_BASELINE)
    job = subprocess.Popen(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, str(script), str(counted)], env=env()
    )
    try:
        deadline = time.monotonic() + 60
        while not all((folder / f"counted.ready{rank}").exists() for rank in (0, 1)):
            assert time.monotonic() < deadline and job.poll() is None, (
                "the baseline MPI program did not start"
            )
            time.sleep(0.05)
        ranks = rank_processes(job, 2, deadline)
        counts = [len(beyond_loopback(own_listeners(rank))) for rank in ranks]
    finally:
        counted.touch()
        assert job.wait(timeout=60) == 0
    return max(counts)


@pytest.mark.parametrize("flags", [[], ["--tp", "2"]], ids=["data-parallel", "tensor-parallel"])
def test_one_node_job_listens_on_loopback_only_and_runs_no_planted_pickle(
    tmp_path, flags, mpi_listeners_per_rank
):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(str(marker)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(12)))
    output = tmp_path / "out"
    gate = JobGate(
        tmp_path / "gate", after=1
    )  # held once the ranks have loaded, joined their groups, made images
    job = subprocess.Popen(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "omni-diffuse"),
            "generate",
            "--prompts",
            str(prompts),
            "--output",
            str(output),
            "--steps",
            "4",
            "--height",
            "64",
            "--width",
            "64",
            "--batch-size",
            "2",
            *flags,
        ],
        env=gate.env(env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        gate.wait_held(job)
        ranks = rank_processes(job, 2, time.monotonic() + 60)
        listeners = {rank.pid: own_listeners(rank) for rank in ranks}
        for pid, found in listeners.items():
            extra = beyond_loopback(found)
            assert len(extra) <= mpi_listeners_per_rank, (
                f"rank pid {pid} listens beyond loopback: {extra}"
            )
        ports = {port for found in listeners.values() for _, port in found}
        with ThreadPoolExecutor(
            max_workers=max(1, len(ports))
        ) as pool:  # each silent peer costs its 2 s timeout
            list(
                pool.map(lambda port: _plant_raw(port, payload), ports)
            )  # all land while the job is held
            stores = [pool.submit(_plant_in_store, port, payload) for port in ports]
            gate.release()  # a TCPStore client can wait on a live silent peer until the job ends
            log, _ = job.communicate(timeout=180)
            for store in stores:
                store.result(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert not marker.exists(), "a planted pickle ran"
    if job.returncode == 0:  # it ignored the stranger and finished every image
        run = json.loads((output / "run.json").read_text())
        assert run["status"] == "complete" and run["totals"]["images_ok"] == 12, log[-3000:]
    else:  # or it failed loudly; never silently
        assert "error" in log.lower(), log[-3000:]


class _Payload:
    """Unpickling this creates the marker file: what an attacker would plant."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_raw(port: int, payload: bytes) -> None:
    """Send the payload the ways a stranger would: raw and length-prefixed."""
    for data in (payload, len(payload).to_bytes(8, "little") + payload):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
                connection.sendall(data)
        except OSError:
            pass


def _plant_in_store(port: int, payload: bytes) -> None:
    """The payload as a TCPStore ``set`` of the key names an old build read results from."""
    try:
        from torch.distributed import TCPStore

        store = TCPStore(
            "127.0.0.1", port, None, False, timeout=__import__("datetime").timedelta(seconds=2)
        )
        for key in ("stream-1/result/0", "stream-1/next"):
            store.set(key, payload)
    except Exception:  # noqa: BLE001 - not a store: fine, that is the point
        pass


def test_multi_node_rendezvous_keys_are_under_a_secret_prefix(monkeypatch):
    from torch.distributed import TCPStore

    monkeypatch.setenv(
        "GLOO_SOCKET_IFNAME", "lo"
    )  # connect() would pick this process's gloo interface

    server = RendezvousServer(world_size=2, one_node=False)
    try:
        rendezvous = server.rendezvous
        assert len(rendezvous.prefix) == 32 and rendezvous.path is None
        rendezvous.connect(0).set("parallel/rank", "job data")
        stranger = TCPStore("127.0.0.1", rendezvous.port, None, False)
        assert not stranger.check(["parallel/rank"])  # the key cannot be named without the secret
        assert stranger.check([f"{rendezvous.prefix}/parallel/rank"])
        assert RendezvousServer(world_size=2, one_node=False).rendezvous.prefix != rendezvous.prefix
    finally:
        server.close()


def test_one_node_rendezvous_is_a_private_file():

    server = RendezvousServer(world_size=1, one_node=True)
    try:
        path = Path(server.rendezvous.path)
        assert server.rendezvous.hosts == ()
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        server.rendezvous.connect(0).set("k", "v")
    finally:
        server.close()
    assert not path.parent.exists()


def test_a_lost_batch_makes_the_run_incomplete_and_names_the_missing_items(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    output = tmp_path / "out"
    done = subprocess.run(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "omni-diffuse"),
            "generate",
            "--prompts",
            str(prompts),
            "--output",
            str(output),
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--batch-size",
            "2",
            "--executor",
            "fault_executors.LossyMPIExecutor",
        ],
        env=env(PYTHONPATH=str(TESTS)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "incomplete"
    assert {entry["id"] for entry in run["missing"]} == {
        "000003",
        "000004",
    }  # the lost batch of two
    assert run["totals"]["images_ok"] == 4 and run["totals"]["images_missing"] == 2
    assert "000003" in done.stderr and "missing" in done.stderr
