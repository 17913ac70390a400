"""``omni-diffuse serve`` as users start it: under mpiexec -n 2 (rank 0 serves HTTP, both
ranks serve the engine), its refusals before loading, and ``generate --trace/--metrics-port``."""

# ruff: noqa: PLC0415 - optional extras load only where used (requests, sseclient)

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from gates import HoldForSignal
from helpers import make_random_lora
from launch import BIN
from PIL import Image

from spmd_diffusion.jobs.video import default_video_format, read_frames

pytestmark = [pytest.mark.launcher, pytest.mark.slow]
openai = pytest.importorskip("openai", reason="the test extra installs openai")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("serve did not come up")


def stop_server(process: subprocess.Popen) -> None:
    """Ctrl-C the server (every rank), as a user would; killed, and a failure, if it stays."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("serve did not stop on SIGINT") from None


def test_serve_under_mpiexec_uses_both_replicas_and_answers_the_openai_client():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_DIFFUSION_API_KEY": "k"}
    process = subprocess.Popen(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "omni-diffuse"),
            "serve",
            "--model",
            "tiny-unet",
            "--port",
            str(port),
            "--batch-size",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k")
        result = client.images.generate(
            model="tiny-unet", prompt="a cat", n=2, size="64x64", response_format="b64_json"
        )
        sizes = [
            Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size for item in result.data
        ]
        assert sizes == [(64, 64), (64, 64)]

        # concurrent clients: the engine spreads their batches over both replicas
        def one(index: int) -> None:
            client.images.generate(
                prompt=f"p{index}", n=1, size="32x32", extra_body={"num_inference_steps": 8}
            )

        threads = [threading.Thread(target=one, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        with pytest.raises(
            urllib.error.HTTPError
        ) as refused:  # behind the key, like every route but /health
            urllib.request.urlopen(url + "/metrics", timeout=10)
        assert refused.value.code == 401
        metrics_call = urllib.request.Request(
            url + "/metrics", headers={"Authorization": "Bearer k"}
        )
        with urllib.request.urlopen(metrics_call, timeout=10) as response:
            metrics = response.read().decode()
        busy = [
            line
            for line in metrics.splitlines()
            if line.startswith("spmd_diffusion_replica_busy_seconds_total")
        ]
        assert {line.split('"')[1] for line in busy} == {"0", "1"}, busy
    finally:
        stop_server(process)
    assert process.returncode == 130, (
        process.stderr.read()
    )  # interrupted: one line, every rank gone


def run_cli(
    *args: str, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "omni-diffuse"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_serve_refuses_to_listen_beyond_loopback_without_a_key_before_loading():
    env = {key: value for key, value in os.environ.items() if key != "SPMD_DIFFUSION_API_KEY"}
    done = subprocess.run(
        [str(BIN / "omni-diffuse"), "serve", "--host", "0.0.0.0", "--model", "tiny-unet"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 2 and "listening on 0.0.0.0 needs an API key" in done.stderr
    assert "Traceback" not in done.stderr and "loaded" not in done.stderr


def test_serve_refuses_a_busy_port_and_a_bad_schedule_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--model", "tiny-unet", "--port", str(port))
        assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    done = run_cli("serve", "--model", "tiny-unet", "--schedule", "random")
    assert done.returncode == 2 and "unknown schedule 'random'" in done.stderr
    done = run_cli("serve", "--model", "tiny-unet", "--hook", "no_such_module.Hook")
    assert done.returncode == 2 and "cannot load hook" in done.stderr
    done = run_cli("serve", "--model", "tiny-unet", "--lora", "style=/no/such/adapter")
    assert (
        done.returncode == 2
        and "--lora style=/no/such/adapter: '/no/such/adapter' does not exist" in done.stderr
    )
    done = run_cli("serve", "--model", "tiny-unet", "--lora-dir", "/no/such/dir")
    assert done.returncode == 2 and "is not a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_generate_writes_a_trace_and_serves_metrics(tmp_path):
    port = free_port()
    trace = tmp_path / "trace.jsonl"
    done = run_cli(
        "generate",
        "--model",
        "tiny-unet",
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--output",
        str(tmp_path / "out"),
        "--trace",
        str(trace),
        "--metrics-port",
        str(port),
        "--schedule",
        "cost",
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert f"metrics on http://127.0.0.1:{port}/metrics" in done.stderr
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds.count("request_queued") == 2 and kinds.count("request_done") == 2
    assert (
        kinds.index("batch_started") < kinds.index("batch_finished") < kinds.index("request_done")
    )


def metric(url: str, name: str) -> float:
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer k"})
    with urllib.request.urlopen(request, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def leave_after_first_step(url: str, request_id: str, size: int) -> list[dict]:
    """Stream one 50-step request, read until its first step event, then go away."""
    import requests
    import sseclient

    body = {
        "requests": [
            {
                "prompt": "a cat",
                "request_id": request_id,
                "seed": 1,
                "num_inference_steps": 50,
                "height": size,
                "width": size,
            }
        ],
        "stream": True,
    }
    seen = []
    with requests.post(
        url + "/v1/diffusion/generate",
        json=body,
        stream=True,
        timeout=120,
        headers={"Authorization": "Bearer k"},
    ) as response:
        assert response.status_code == 200, response.text
        for event in sseclient.SSEClient(response).events():
            seen.append(json.loads(event.data))
            if seen[-1]["event"] == "step":
                break
    return seen


@pytest.fixture(scope="module")
def style_lora(tiny_unet, tmp_path_factory):

    return make_random_lora(tmp_path_factory.mktemp("lora") / "style", tiny_unet, seed=1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout, replicas", [([], 2), (["--tp", "2"], 1)], ids=["dp2", "tp2"])
def test_serve_under_mpiexec_streams_steps_and_stops_what_clients_leave(
    layout, replicas, style_lora
):
    """Each replica (rank 1's over MPI under dp2; a replica of both ranks under tp2, whose ranks
    must leave the loop at the same step) streams step events, and stops a request whose
    client left at the next step boundary: its leader is held after step 2 until the
    cancellation arrives, so at most 2 of 50 steps run, on any machine."""

    port = free_port()
    env = HoldForSignal(at_step=2).env(
        {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_DIFFUSION_API_KEY": "k"}
    )
    offered = (
        ["--lora", f"style={style_lora}"] if replicas == 2 else []
    )  # LoRA refuses tensor parallelism
    process = subprocess.Popen(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "omni-diffuse"),
            "serve",
            "--model",
            "tiny-unet",
            "--port",
            str(port),
            "--batch-size",
            "1",
            *layout,
            *offered,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        seen: dict[int, list[dict]] = {}
        threads = [
            threading.Thread(
                target=lambda index=index: seen.__setitem__(
                    index, leave_after_first_step(url, f"leave-{index}", 32 + 8 * index)
                )
            )
            for index in range(replicas)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        started = {events[1]["replica"] for events in seen.values()}
        assert started == set(range(replicas)), seen  # under dp2 each replica ran one
        deadline = time.monotonic() + 120
        while metric(url, 'spmd_diffusion_requests_total{outcome="cancelled"}') < replicas:
            assert time.monotonic() < deadline, "the requests were not stopped"
            time.sleep(0.1)
        # at most 2 of 50 steps each: the leader is held after step 2 until the cancellation arrives
        assert replicas <= metric(url, "spmd_diffusion_step_seconds_count") <= 2 * replicas
        assert metric(url, "spmd_diffusion_images_total") == 0
        client = openai.OpenAI(base_url=url + "/v1", api_key="k")
        assert (
            len(
                client.images.generate(
                    prompt="after", n=1, size="32x32", extra_body={"num_inference_steps": 2}
                ).data
            )
            == 1
        )
        if offered:  # a named adapter on both replicas (two requests of other shapes: one each)
            import requests

            body = {
                "requests": [
                    {
                        "prompt": "styled",
                        "seed": 1,
                        "num_inference_steps": 2,
                        "lora": "style:0.7",
                        "height": 32 + 8 * index,
                        "width": 32,
                    }
                    for index in range(2)
                ]
            }
            answer = requests.post(
                url + "/v1/diffusion/generate",
                json=body,
                timeout=120,
                headers={"Authorization": "Bearer k"},
            ).json()
            assert answer["errors"] == [None, None], answer
            assert {record["rank"] for record in answer["metadata"]} == {0, 1}
            assert all(
                record["lora"] == [{"name": "style", "scale": 0.7}] for record in answer["metadata"]
            )
    finally:
        stop_server(process)


@pytest.mark.timeout(300)
def test_video_jobs_under_mpiexec(tiny_video):
    """The openai client's video jobs against a 2-replica server of the tiny Wan model."""

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPMD_DIFFUSION_API_KEY": "k"}
    process = subprocess.Popen(
        [
            str(BIN / "mpiexec"),
            "-n",
            "2",
            str(BIN / "omni-diffuse"),
            "serve",
            "--model",
            "tiny-video",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(process, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k")
        jobs = [
            client.videos.create(
                prompt=f"a wave {index}",
                size="64x64",
                extra_body={"num_frames": 5, "num_inference_steps": 2, "seed": index},
            )
            for index in range(2)
        ]
        for job in jobs:
            deadline = time.monotonic() + 120
            while (job := client.videos.retrieve(job.id)).status in ("queued", "in_progress"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job.status == "completed" and job.progress == 100, job
            frames = read_frames(
                client.videos.download_content(job.id).read(), default_video_format()
            )
            assert len(frames) == 5 and frames[0].size == (64, 64)
    finally:
        stop_server(process)
