"""Two simulated nodes (network namespaces joined by a veth pair, own host names and
/etc/hosts; see tests/two_nodes.py): hydra's mpiexec started through a launcher script
that enters them, and torchrun in each. Covers data parallelism and ``--tp 2`` across the
nodes in the three /etc/hosts layouts (shared; rank 0's node known only by its short
name; each node's own name mapped to 127.0.1.1), and a layout that cannot be fixed
automatically (MASTER_ADDR that does not resolve), which must fail within 60 s naming it.

    python -m pytest -m netns tests/cluster/test_two_nodes.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch import BIN
from two_nodes import TwoNodes, unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(180)]

ARGS = [
    "generate",
    "--model",
    "tiny-unet",
    "--steps",
    "2",
    "--height",
    "32",
    "--width",
    "32",
    "--batch-size",
    "1",
    "--prompt",
    "a red fox",
    "--prompt",
    "a blue boat",
    "--prompt",
    "a green hill",
]
ENV = ["OMP_NUM_THREADS", "1", "TOKENIZERS_PARALLELISM", "false"]


@pytest.fixture(scope="module")
def nodes():
    reason = unavailable()
    if reason:
        pytest.skip(f"no simulated nodes here: {reason}")
    pair = TwoNodes()
    try:
        pair.start()
    except subprocess.CalledProcessError as exc:
        pair.stop()
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    yield pair
    pair.stop()


def mpiexec(nodes: TwoNodes, tmp_path: Path, *args: str, env: tuple[str, ...] = ()) -> list[str]:
    genv = [
        item
        for pair in zip(ENV[::2] + list(env[::2]), ENV[1::2] + list(env[1::2]), strict=True)
        for item in ("-genv", *pair)
    ]
    return nodes.command(
        "nodea",
        [
            str(BIN / "mpiexec"),
            "-hosts",
            "nodea,nodeb",
            "-n",
            "2",
            "-ppn",
            "1",
            "-launcher",
            "ssh",
            "-launcher-exec",
            str(nodes.launcher_script(tmp_path)),
            *genv,
            str(BIN / "omni-diffuse"),
            *args,
        ],
    )


def finished(done: subprocess.CompletedProcess, output: Path) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    run = json.loads((output / "run.json").read_text())
    assert run["status"] == "complete" and run["totals"]["images_ok"] == 3
    return run


@pytest.mark.parametrize("layout, tp", [("shared", 1), ("short-name", 2), ("127.0.1.1", 2)])
def test_mpiexec_across_two_nodes(nodes, tmp_path, layout, tp):
    nodes.set_layout(layout)
    output = tmp_path / "out"
    done = subprocess.run(
        mpiexec(nodes, tmp_path, *ARGS, "--tp", str(tp), "--output", str(output)),
        capture_output=True,
        text=True,
        timeout=150,
    )
    run = finished(done, output)
    assert run["layout"]["world_size"] == 2 and run["layout"]["tensor_parallel_size"] == tp
    ranks = {
        json.loads(line)["rank"] for line in (output / "manifest.jsonl").read_text().splitlines()
    }
    assert ranks == ({0, 1} if tp == 1 else {0})  # data parallel: both nodes made images


def test_torchrun_on_each_node_with_self_names_on_127_0_1_1(nodes, tmp_path):
    nodes.set_layout("127.0.1.1")
    output = tmp_path / "out"
    processes = []
    for rank, node in enumerate(("nodea", "nodeb")):
        command = nodes.command(
            node,
            [
                "env",
                *(f"{k}={v}" for k, v in zip(ENV[::2], ENV[1::2], strict=True)),
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "nodea",
                "--master-port",
                "29731",
                "-m",
                "spmd_diffusion",
                *ARGS,
                "--tp",
                "2",
                "--output",
                str(output),
            ],
        )
        processes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=150)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    assert results[1].returncode == 0, results[1].stderr[-3000:]
    run = finished(results[0], output)
    assert run["layout"]["launcher"] == "torchrun" and run["layout"]["tensor_parallel_size"] == 2


def test_a_rank0_address_no_node_resolves_fails_within_60_s_naming_it(nodes, tmp_path):
    nodes.set_layout("short-name")
    started = time.monotonic()
    done = subprocess.run(
        mpiexec(
            nodes,
            tmp_path,
            *ARGS,
            "--tp",
            "2",
            "--output",
            str(tmp_path / "out"),
            env=("MASTER_ADDR", "nodea.cluster.example"),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 60, done.stderr[-3000:]
    assert "nodea.cluster.example" in done.stderr and "MASTER_ADDR" in done.stderr, done.stderr[
        -3000:
    ]


def rank_process(output: Path, rank: int) -> int | None:
    """The pid of this test's own rank ``rank`` (its command names ``output``)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            str(output).encode() in cmdline
            and b"omni-diffuse" in b" ".join(cmdline)
            and f"PMI_RANK={rank}".encode() in environ
        ):
            return int(proc.name)
    return None


def test_a_killed_remote_rank_ends_the_job(nodes, tmp_path):
    nodes.set_layout("shared")
    output = tmp_path / "out"
    many = [item for i in range(40) for item in ("--prompt", f"a small picture number {i}")]
    process = subprocess.Popen(
        mpiexec(nodes, tmp_path, *ARGS[:-6], *many, "--output", str(output)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    manifest = output / "manifest.jsonl"
    while not (manifest.exists() and manifest.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = rank_process(output, 1)
    assert pid is not None, "rank 1 is not running"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and time.monotonic() - killed < 30, stderr[-3000:]
    run = json.loads((output / "run.json").read_text())
    assert run["status"] in ("failed", "running", "interrupted"), run["status"]
