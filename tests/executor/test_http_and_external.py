"""The HTTP API and the executors that forward to other systems (http, external)."""

# ruff: noqa: PLC0415 - test-local or optional helpers (my_package)

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from helpers import same_pixels, small_requests

from spmd_diffusion import DiffusionEngine, OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import MessageKind, RpcReply, RpcRequest
from spmd_diffusion.distributed.shm_channel import ShmChannel
from spmd_diffusion.entrypoints.server import serve
from spmd_diffusion.errors import SpmdDiffusionError
from spmd_diffusion.executor.external_executor import REMOTE

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).parents[1] / "design_examples"))


@pytest.fixture(scope="module")
def server(tiny_unet):
    with DiffusionEngine(OmniDiffusionConfig(executor_class="uni")) as engine:
        http = serve(engine, "127.0.0.1", 0)
        thread = threading.Thread(target=http.serve_forever, daemon=True)
        thread.start()
        yield http
        http.shutdown()
        http.server_close()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


def test_http_executor_matches_the_engine_behind_it(server):
    requests = small_requests(2)
    expected = server.engine.generate(requests)
    config = OmniDiffusionConfig(executor_class="http", executor_config={"base_url": server.url})
    with DiffusionEngine(config) as engine:
        engine.check_health()
        outputs = engine.generate(requests)
        assert same_pixels(expected, outputs)
        with pytest.raises(NotImplementedError, match="only generate and check_health"):
            engine.collective_rpc("sleep")


def test_design_documents_http_example_against_the_server(server):
    from my_package import HTTPDiffusionExecutor

    config = OmniDiffusionConfig(
        executor_class=HTTPDiffusionExecutor, executor_config={"base_url": server.url}
    )
    with DiffusionEngine(config) as engine:
        outputs = engine.generate(small_requests(1))
    assert same_pixels(server.engine.generate(small_requests(1)), outputs)


def test_health_metrics_and_bad_input(server):
    assert _get(server.url + "/health") == (200, '{"status": "ok"}')
    status, metrics = _get(server.url + "/metrics")
    assert status == 200 and "spmd_diffusion_images_total" in metrics
    bad = urllib.request.Request(
        server.url + "/v1/diffusion/generate",
        data=json.dumps({"requests": [{"prompt": "x", "height": 10}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=30)
    assert (
        caught.value.code == 400
        and "height must be a positive multiple of 8" in caught.value.read().decode()
    )


def test_http_executor_reports_an_unreachable_server():
    config = OmniDiffusionConfig(
        executor_class="http", executor_config={"base_url": "http://127.0.0.1:9"}
    )
    with DiffusionEngine(config) as engine, pytest.raises(SpmdDiffusionError, match="cannot reach"):
        engine.generate(small_requests(1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_external_executor_drives_a_worker_it_did_not_start(tiny_unet, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("SPMD_DIFFUSION_AUTHKEY", "test-secret")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spmd_diffusion",
            "worker",
            "--listen",
            f"127.0.0.1:{port}",
            "--model",
            tiny_unet,
        ],
    )
    try:
        config = OmniDiffusionConfig(
            executor_class="external", executor_config={"worker_addresses": [f"127.0.0.1:{port}"]}
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                engine = DiffusionEngine(config)
                break
            except (ConnectionRefusedError, OSError):
                assert time.monotonic() < deadline and worker.poll() is None, (
                    "worker did not come up"
                )
                time.sleep(0.5)
        with engine:
            outputs = engine.generate(small_requests(2))
            assert all(o.ok for o in outputs)
        assert worker.poll() is None, "shutdown of the executor must leave the worker running"
        with DiffusionEngine(config) as again:  # a second client reuses the loaded worker
            assert same_pixels(outputs, again.generate(small_requests(2)))
            again.executor.transport.send(0, RpcRequest(MessageKind.SHUTDOWN))
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


def test_external_worker_survives_scans_silence_garbage_and_wrong_keys(tiny_unet, monkeypatch):
    """Port scans, a client that never speaks, an oversized or garbled handshake, a wrong
    key and a malformed message after a good handshake cost that connection alone."""

    port = _free_port()
    monkeypatch.setenv("SPMD_DIFFUSION_AUTHKEY", "test-secret")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spmd_diffusion",
            "worker",
            "--listen",
            f"127.0.0.1:{port}",
            "--model",
            tiny_unet,
        ],
    )
    silent = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()  # a port scan
                break
            except OSError:
                assert time.monotonic() < deadline and worker.poll() is None, (
                    "worker did not come up"
                )
                time.sleep(0.5)
        silent = socket.create_connection(("127.0.0.1", port))  # connects and never speaks
        for junk in (b"\xff\xff\xff\xff" + b"x" * 16, b"\x00\x00\x00\x05hello", bytes(range(256))):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(junk)
        with pytest.raises(AuthenticationError):
            Client(("127.0.0.1", port), authkey=b"wrong-key")
        trusted = ShmChannel(Client(("127.0.0.1", port), authkey=b"test-secret"), threshold=REMOTE)
        trusted.send(("not", "a", "request"))  # a malformed envelope after a good handshake
        reply = RpcReply._make(trusted.recv())
        assert reply.failure is not None and reply.failure.exc_type == "KeyError"  # an error reply
        trusted.close()
        config = OmniDiffusionConfig(
            executor_class="external", executor_config={"worker_addresses": [f"127.0.0.1:{port}"]}
        )
        with DiffusionEngine(config) as engine:  # served while the silent client still hangs on
            assert all(output.ok for output in engine.generate(small_requests(1)))
        assert worker.poll() is None
    finally:
        if silent is not None:
            silent.close()
        worker.kill()


def test_worker_listen_address_is_checked_before_loading(monkeypatch):
    monkeypatch.setenv("SPMD_DIFFUSION_AUTHKEY", "k")
    done = subprocess.run(
        [sys.executable, "-m", "spmd_diffusion", "worker", "--listen", "127.0.0.1:70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "port in 1-65535" in done.stderr and "loaded" not in done.stderr
