"""The HTTP server: OpenAI client, token, error shape, bad bodies, health under load,
concurrent clients, disconnects, Prometheus output."""

# ruff: noqa: PLC0415 - the test extra's clients (requests, sseclient) and prometheus' parser are
# imported by the tests that use them

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time

import pytest
from gates import DenoiserGate, HoldForSignal, SlowDenoiser
from PIL import Image
from serving import KEY, call

from spmd_diffusion import OmniDiffusionConfig
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.http.state import ServingState
from spmd_diffusion.entrypoints.server import (
    ROUTERS,
    ServerLimits,
    check_listen_address,
    parse_size,
    serve,
)

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai", reason="the test extra installs openai")


@pytest.fixture(scope="module")
def server(tiny_unet):
    engine = AsyncDiffusionEngine(
        OmniDiffusionConfig(executor_class="uni", max_batch_size=4), max_wait_s=0.02
    )
    http = serve(
        engine,
        "127.0.0.1",
        0,
        api_key=KEY,
        model_name="tiny-unet",
        limits=ServerLimits(max_body_bytes=1 << 20, max_requests_per_call=8),
    ).start()
    yield http
    http.shutdown()
    http.server_close()


def native(count: int, steps: int = 2, prefix: str = "r") -> dict:
    return {
        "requests": [
            {
                "prompt": f"p{i}",
                "request_id": f"{prefix}{i}",
                "seed": i,
                "num_inference_steps": steps,
                "height": 32,
                "width": 32,
            }
            for i in range(count)
        ]
    }


def test_the_openai_client_gets_two_decodable_images(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    result = client.images.generate(
        model="tiny-unet", prompt="a red square", n=2, size="64x64", response_format="b64_json"
    )
    assert len(result.data) == 2
    for item in result.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (64, 64)
    assert [model.id for model in client.models.list().data] == ["tiny-unet"]


def test_the_token_is_required_on_every_route_but_health(server):
    for key in (None, "wrong"):
        for path, body in (
            ("/v1/models", None),
            ("/v1/images/generations", {"prompt": "x"}),
            ("/v1/diffusion/generate", native(1)),
            ("/metrics", None),
        ):
            status, answer = call(server.url + path, body, key=key)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", (
                path,
                key,
                answer,
            )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").images.generate(prompt="x")
    assert call(server.url + "/health", key=None) == (200, {"status": "ok"})


NESTED = b'{"requests": ' + b"[" * 100000 + b"]" * 100000 + b"}"
BAD_BODIES = [
    # (name, path, body, status, message)
    ("not json", "/v1/diffusion/generate", b"{nope", 400, "not JSON"),
    ("binary", "/v1/diffusion/generate", bytes(range(256)), 400, "not JSON"),
    ("deeply nested", "/v1/diffusion/generate", NESTED, 400, "nested too deeply"),
    ("a list body", "/v1/diffusion/generate", b"[1, 2]", 400, 'body must be {"requests"'),
    (
        "unknown top-level key",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x"}], "more": 1},
        400,
        "and nothing else",
    ),
    ("empty request list", "/v1/diffusion/generate", {"requests": []}, 400, "non-empty list"),
    ("requests not a list", "/v1/diffusion/generate", {"requests": "x"}, 400, "non-empty list"),
    (
        "a request not an object",
        "/v1/diffusion/generate",
        {"requests": [3]},
        400,
        "requests[0] must be an object",
    ),
    ("too many requests", "/v1/diffusion/generate", native(9), 400, "the limit is 8"),
    (
        "unknown request field",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "colour": 1}]},
        400,
        "unknown request field(s): colour",
    ),
    (
        "duplicate ids",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "request_id": "a"}, {"prompt": "y", "request_id": "a"}]},
        400,
        "duplicate request_id 'a'",
    ),
    (
        "bad height",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "height": 10}]},
        400,
        "height must be a positive multiple of 8",
    ),
    (
        "height over the limit",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "height": 100000}]},
        400,
        "above the limit",
    ),
    (
        "steps over the limit",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "num_inference_steps": 5000}]},
        400,
        "above the limit",
    ),
    (
        "NaN guidance",
        "/v1/diffusion/generate",
        b'{"requests": [{"prompt": "x", "guidance_scale": NaN}]}',
        400,
        "finite number",
    ),
    (
        "latent output",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "extra": {"output_type": "latent"}}]},
        400,
        "output_type must be one of",
    ),
    (
        "extra overrides height",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "extra": {"height": 8}}]},
        400,
        "extra may not set height",
    ),
    (
        "negative seed",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "seed": -1}]},
        400,
        "seed must be",
    ),
    (
        "prompt not a string",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": ["x"]}]},
        400,
        "prompt must be a string",
    ),
    ("openai: no prompt", "/v1/images/generations", {"n": 1}, 400, "prompt: Field required"),
    (
        "openai: n = 0",
        "/v1/images/generations",
        {"prompt": "x", "n": 0},
        400,
        "n: Input should be greater",
    ),
    (
        "openai: n over the limit",
        "/v1/images/generations",
        {"prompt": "x", "n": 1000},
        400,
        "above the limit",
    ),
    (
        "openai: bad size",
        "/v1/images/generations",
        {"prompt": "x", "size": "big"},
        400,
        "size must look like",
    ),
    (
        "openai: size not a multiple of 8",
        "/v1/images/generations",
        {"prompt": "x", "size": "10x10"},
        400,
        "multiple of 8",
    ),
    (
        "openai: url format",
        "/v1/images/generations",
        {"prompt": "x", "response_format": "url"},
        400,
        "not supported",
    ),
    (
        "openai: unknown field",
        "/v1/images/generations",
        {"prompt": "x", "colour": "red"},
        400,
        "colour: Extra inputs are not permitted",
    ),
    (
        "openai: another model",
        "/v1/images/generations",
        {"prompt": "x", "model": "dall-e-3"},
        404,
        "does not exist",
    ),
    (
        "openai: infinite guidance",
        "/v1/images/generations",
        b'{"prompt": "x", "guidance_scale": Infinity}',
        400,
        "guidance_scale",
    ),
    ("openai: prompt too long", "/v1/images/generations", {"prompt": "x" * 20000}, 400, "prompt"),
    (
        "openai: prompt one past the cap",
        "/v1/images/generations",
        {"prompt": "x" * 8193},
        400,
        "prompt: String should have at most 8192 characters",
    ),
    (
        "native: negative prompt past the cap",
        "/v1/diffusion/generate",
        {"requests": [{"prompt": "x", "negative_prompt": "n" * 8193}]},
        400,
        "negative_prompt is 8193 characters; the most is 8192",
    ),
    ("openai: empty body", "/v1/images/generations", b"", 400, "Field required"),
    ("no such route", "/v1/other", {"prompt": "x"}, 404, "Not Found"),
]


@pytest.mark.parametrize(
    "name, path, body, status, message", BAD_BODIES, ids=[case[0] for case in BAD_BODIES]
)
def test_bad_bodies_get_a_4xx_in_openais_error_shape(server, name, path, body, status, message):
    got, answer = call(server.url + path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }, answer
    assert message in answer["error"]["message"], answer
    assert call(server.url + "/health", key=None)[0] == 200  # and the server is still there


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    host, port = server.socket.getsockname()[:2]
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/diffusion/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {2 << 20}\r\n\r\n{{".encode()
        )
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert response.status == 413
        assert "over 1048576 bytes" in json.loads(response.read())["error"]["message"]


MACHINE_SPEEDS = pytest.mark.parametrize(
    "step_delay", [0.0, 0.3], ids=["fast-machine", "slow-machine"]
)


@MACHINE_SPEEDS
def test_health_answers_while_a_batch_runs(server, step_delay):
    """The batch is held inside the denoiser until health has answered: that it answers at
    all proves it does not wait behind a running batch, on any machine (the slow machine:
    every denoiser call takes ``step_delay`` longer)."""
    long = {
        "requests": [
            {
                "prompt": "long",
                "request_id": "long-health",
                "seed": 1,
                "num_inference_steps": 2,
                "height": 64,
                "width": 64,
            }
        ]
    }
    with (
        SlowDenoiser(server.async_engine.engine, step_delay),
        DenoiserGate(server.async_engine.engine) as gate,
    ):
        worker = threading.Thread(target=call, args=(server.url + "/v1/diffusion/generate", long))
        worker.start()
        gate.wait_entered()
        assert server.async_engine.running == 1
        assert call(server.url + "/health", key=None, timeout=30) == (200, {"status": "ok"})
        assert server.async_engine.running == 1 and worker.is_alive()
    worker.join(timeout=120)


def test_twenty_concurrent_clients_all_get_their_images(server):
    answers: dict[int, tuple[int, dict]] = {}

    def client(index: int) -> None:
        answers[index] = call(server.url + "/v1/diffusion/generate", native(1, prefix=f"c{index}-"))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(answers) == list(range(20))
    for index, (status, answer) in answers.items():
        assert (
            status == 200
            and answer["request_ids"] == [f"c{index}-0"]
            and answer["errors"] == [None]
        )
        assert len(answer["images"][0]) == 1


@MACHINE_SPEEDS
def test_a_client_that_disconnects_cancels_its_requests_started_or_not(server, step_delay):
    """The first batch is held in the denoiser while the client goes away: what was queued
    behind it is dropped, and the held batch, told while held, stops at its first step
    boundary once released -- 1 of its 20 steps run, no image made, the replica free again;
    on a fast and a slow machine alike."""
    engine = server.async_engine
    before = engine.engine.collective_rpc("get_cache_stats")[0]["images_generated"]
    metrics_before = call(server.url + "/metrics")[1]
    cancelled_before = sample(metrics_before, 'spmd_diffusion_requests_total{outcome="cancelled"}')
    steps_before = sample(metrics_before, "spmd_diffusion_step_seconds_count")
    signals_before = engine.signals_sent
    body = json.dumps(native(8, steps=20, prefix="gone-")).encode()
    host, port = server.socket.getsockname()[:2]
    with SlowDenoiser(engine.engine, step_delay), DenoiserGate(engine.engine) as gate:
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(
                b"POST /v1/diffusion/generate HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            gate.wait_entered()
            started = engine.running
            assert 1 <= started <= 4 and engine.queued == 8 - started
        wait_for(
            lambda: engine.queued == 0 and engine.signals_sent - signals_before == started,
            "the requests were not cancelled",
        )
        assert engine.running == started  # the held batch is still running
    wait_for(lambda: engine.running == 0, "the held batch did not stop")
    made = engine.engine.collective_rpc("get_cache_stats")[0]["images_generated"] - before
    assert made == 0  # the started batch stopped; the others were dropped
    status, text = call(server.url + "/metrics")
    assert (
        "spmd_diffusion_requests_waiting 0.0" in text.splitlines()
    )  # the dropped ones left the gauge
    assert (
        sample(text, 'spmd_diffusion_requests_total{outcome="cancelled"}') - cancelled_before == 8
    )
    assert sample(text, "spmd_diffusion_step_seconds_count") - steps_before == 1  # of 20
    # the replica serves the next request
    assert call(server.url + "/v1/diffusion/generate", native(1, prefix="after-gone-"))[0] == 200


def stream(url: str, body: dict, key: str | None = KEY):
    """The server-sent events of a streamed native call, read with an SSE client, as they come."""
    import requests
    import sseclient

    response = requests.post(
        url + "/v1/diffusion/generate",
        json={**body, "stream": True},
        stream=True,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response, sseclient.SSEClient(response)


def test_a_streamed_call_reports_queued_started_steps_and_done(server):
    response, client = stream(server.url, native(2, steps=6, prefix="sse-"))
    events = [event.data for event in client.events()]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(data) for data in events[:-1]]
    for request_id in ("sse-0", "sse-1"):
        mine = [event for event in parsed if event["request_id"] == request_id]
        kinds = [event["event"] for event in mine]
        assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done", kinds
        steps = [(event["step"], event["steps"]) for event in mine if event["event"] == "step"]
        assert steps and steps[-1] == (6, 6) and steps == sorted(steps), (
            steps
        )  # the last step always told
        output = mine[-1]["output"]
        assert (
            output["request_ids"] == [request_id]
            and output["errors"] == [None]
            and len(output["images"][0]) == 1
        )


def test_a_client_that_leaves_a_stream_stops_its_running_request_between_steps(server):
    """The client reads until the first step event and goes away; the replica leader is held
    after step 2 until the cancellation reaches it (so a fast machine cannot finish first):
    the batch then stops at that boundary (or at step 1, where the cancellation beat the
    leader's own check of it on a loaded machine): at most 2 of 50 steps run, and the replica
    serves again."""
    engine = server.async_engine
    metrics_before = call(server.url + "/metrics")[1]
    steps_before = sample(metrics_before, "spmd_diffusion_step_seconds_count")
    cancelled_before = sample(metrics_before, 'spmd_diffusion_requests_total{outcome="cancelled"}')
    images_before = engine.engine.collective_rpc("get_cache_stats")[0]["images_generated"]
    with HoldForSignal(at_step=2):
        response, client = stream(server.url, native(1, steps=50, prefix="leave-"))
        for event in client.events():
            if json.loads(event.data)["event"] == "step":
                break
        response.close()
        wait_for(lambda: engine.running == 0, "the running request was not stopped")
    text = call(server.url + "/metrics")[1]
    assert 1 <= sample(text, "spmd_diffusion_step_seconds_count") - steps_before <= 2  # of 50
    assert (
        sample(text, 'spmd_diffusion_requests_total{outcome="cancelled"}') - cancelled_before == 1
    )
    assert engine.engine.collective_rpc("get_cache_stats")[0]["images_generated"] == images_before
    assert call(server.url + "/v1/diffusion/generate", native(1, prefix="after-leave-"))[0] == 200


def wait_for(condition, message: str, timeout: float = 60.0) -> None:
    """Until ``condition()`` holds (a state, not a duration)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def sample(metrics_text: str, name: str) -> float:
    """One sample's value in Prometheus text output (0 when absent)."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_prometheus_output_parses_and_counts_what_was_made(server):
    from prometheus_client.parser import text_string_to_metric_families

    status, answer = call(server.url + "/v1/diffusion/generate", native(3, prefix="prom-"))
    assert status == 200
    status, text = call(server.url + "/metrics")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in (
        "spmd_diffusion_queue_seconds",
        "spmd_diffusion_request_latency_seconds",
        "spmd_diffusion_batch_images",
        "spmd_diffusion_step_seconds",
        "spmd_diffusion_images",
        "spmd_diffusion_requests",
        "spmd_diffusion_replica_busy_seconds",
        "spmd_diffusion_http_requests",
    ):
        assert name in families, sorted(families)

    def value(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    ok = value("spmd_diffusion_requests", "spmd_diffusion_requests_total", outcome="ok")
    assert value("spmd_diffusion_images", "spmd_diffusion_images_total") >= ok >= 3
    assert (
        value(
            "spmd_diffusion_request_latency_seconds", "spmd_diffusion_request_latency_seconds_count"
        )
        >= ok
    )
    assert (
        value("spmd_diffusion_step_seconds", "spmd_diffusion_step_seconds_count") >= 3 * 2 / 4
    )  # >= one batch
    assert (
        value(
            "spmd_diffusion_replica_busy_seconds",
            "spmd_diffusion_replica_busy_seconds_total",
            replica="0",
        )
        > 0
    )
    assert (
        value(
            "spmd_diffusion_http_requests",
            "spmd_diffusion_http_requests_total",
            route="/v1/diffusion/generate",
            status="200",
        )
        >= 1
    )


def test_sizes_and_listen_addresses():
    assert (
        parse_size("64x32") == (32, 64)
        and parse_size(None) == (None, None)
        and parse_size("auto") == (None, None)
    )
    check_listen_address("127.0.0.1", None)
    check_listen_address("::1", None)
    check_listen_address("0.0.0.0", "key")
    with pytest.raises(ValueError, match="needs an API key"):
        check_listen_address("0.0.0.0", None)


def test_the_routes_are_the_routers_over_one_app_state(server):
    state = server.app.app.state.serving  # the app inside the body-guard middleware
    assert isinstance(state, ServingState) and state.api_key == KEY
    modules = {route.endpoint.__module__ for router in ROUTERS for route in router.routes}
    assert modules == {
        f"spmd_diffusion.entrypoints.http.{name}"
        for name in ("status", "images", "edits", "videos", "native")
    }
    state.model_name = "renamed"  # the routes read the app's state, nothing captured
    try:
        status, answer = call(server.url + "/v1/models")
    finally:
        state.model_name = "tiny-unet"
    assert status == 200 and answer["data"][0]["id"] == "renamed"
