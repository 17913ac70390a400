"""Per-request LoRA over HTTP: adapters named from the operator's allow-list (never a path),
loaded on demand into an LRU of --max-loras per replica, pixels equal to the same item run
with the adapter's path, records naming the adapters, different sets never sharing a batch."""

# ruff: noqa: PLC0415 - optional extras load only where used (requests, sseclient)

from __future__ import annotations

import json

import pytest
from helpers import make_random_lora, same_pixels
from serving import KEY, call

from spmd_diffusion import OmniDiffusionConfig, OmniDiffusionRequest
from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.entrypoints.http.loras import lora_catalog, resolve_loras, split_lora_options
from spmd_diffusion.entrypoints.server import serve

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai", reason="the test extra installs openai")


@pytest.fixture(scope="module")
def adapters(tiny_unet, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "style": make_random_lora(root / "style", tiny_unet, seed=1),
        "detail": make_random_lora(root / "detail", tiny_unet, seed=2),
    }


@pytest.fixture(scope="module")
def lora_server(adapters):
    engine = AsyncDiffusionEngine(
        OmniDiffusionConfig(executor_class="uni", max_loras=1, max_batch_size=4), max_wait_s=0.05
    )
    http = serve(
        engine, "127.0.0.1", 0, api_key=KEY, model_name="tiny-unet", loras=adapters
    ).start()
    yield http
    http.shutdown()
    http.server_close()


def item(request_id: str, lora=None, seed: int = 4) -> dict:
    body = {
        "prompt": "a cat",
        "request_id": request_id,
        "seed": seed,
        "num_inference_steps": 2,
        "height": 32,
        "width": 32,
    }
    return body if lora is None else {**body, "lora": lora}


def stats(server) -> dict:
    return server.engine.collective_rpc("get_cache_stats")[0]


def test_a_named_adapter_gives_the_pixels_of_its_path_and_the_record_names_it(
    lora_server, adapters
):

    status, answer = call(
        lora_server.url + "/v1/diffusion/generate", {"requests": [item("named", "style:0.8")]}
    )
    assert status == 200 and answer["errors"] == [None], answer
    assert answer["metadata"][0]["lora"] == [{"name": "style", "scale": 0.8}]
    assert adapters["style"] not in json.dumps(answer)  # the server's paths stay on the server
    direct = lora_server.engine.generate(
        [OmniDiffusionRequest(**{**item("named"), "lora": [adapters["style"] + ":0.8"]})]
    )
    assert same_pixels(
        direct, [DiffusionOutput.from_dict(answer)]
    )  # the item with the adapter's path
    plain = call(lora_server.url + "/v1/diffusion/generate", {"requests": [item("named")]})[1]
    assert not same_pixels([DiffusionOutput.from_dict(plain)], [DiffusionOutput.from_dict(answer)])


def test_adapters_load_on_demand_into_an_lru_of_max_loras(lora_server):
    first = call(
        lora_server.url + "/v1/diffusion/generate", {"requests": [item("lru-a1", "style")]}
    )[1]
    evictions = stats(lora_server)["lora_evictions"]
    call(lora_server.url + "/v1/diffusion/generate", {"requests": [item("lru-b", "detail")]})
    assert stats(lora_server)["lora_adapters_loaded"] == 1  # max_loras=1: style went out for detail
    again = call(
        lora_server.url + "/v1/diffusion/generate", {"requests": [item("lru-a2", "style")]}
    )[1]
    assert stats(lora_server)["lora_evictions"] >= evictions + 2
    assert again["images"] == first["images"]  # reloaded from its file: the same pixels


def test_different_adapter_sets_never_share_a_batch(lora_server):
    import requests
    import sseclient

    body = {
        "requests": [item("set-a", "style"), item("set-b", "detail"), item("set-a2", "style")],
        "stream": True,
    }
    with requests.post(
        lora_server.url + "/v1/diffusion/generate",
        json=body,
        stream=True,
        timeout=120,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        events = [
            json.loads(event.data)
            for event in sseclient.SSEClient(response).events()
            if event.data != "[DONE]"
        ]
    batches = {
        event["request_id"]: event["batch_id"] for event in events if event["event"] == "started"
    }
    assert batches["set-a"] == batches["set-a2"] != batches["set-b"]


@pytest.mark.parametrize(
    "lora, message",
    [
        ("nope", "unknown LoRA 'nope'"),
        ("/etc/passwd", "unknown LoRA '/etc/passwd'"),
        ("org/some-lora", "unknown LoRA 'org/some-lora'"),
        (["style", "style:0.5"], "names style more than once"),
        (3, "must be a list of"),
    ],
    ids=["unknown", "a-path", "a-hub-id", "twice", "a-number"],
)
def test_a_request_may_name_only_offered_adapters(lora_server, lora, message):
    status, answer = call(
        lora_server.url + "/v1/diffusion/generate", {"requests": [item("refused", lora)]}
    )
    assert status == 400 and message in answer["error"]["message"], answer
    assert (
        "offers (detail, style)" in answer["error"]["message"]
        or "more than once" in message
        or "list" in message
    )


def test_the_openai_route_takes_lora_names_too(lora_server):
    client = openai.OpenAI(base_url=lora_server.url + "/v1", api_key=KEY)
    result = client.images.generate(
        prompt="a cat",
        size="32x32",
        extra_body={"lora": "detail", "seed": 1, "num_inference_steps": 2},
    )
    assert len(result.data) == 1
    with pytest.raises(openai.BadRequestError, match="unknown LoRA"):
        client.images.generate(
            prompt="a cat", size="32x32", extra_body={"lora": "/tmp/x.safetensors"}
        )


def test_the_allow_list_comes_from_lora_options_and_a_directory(tmp_path, adapters):
    run, named = split_lora_options(
        ["org/always-on:0.5", f"style={adapters['style']}", "./plain.safetensors"]
    )
    assert run == ["org/always-on:0.5", "./plain.safetensors"] and named == {
        "style": adapters["style"]
    }
    (tmp_path / "one.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an adapter")
    catalog = lora_catalog({"style": adapters["style"]}, str(tmp_path))
    assert sorted(catalog) == ["one", "style"]
    assert resolve_loras(["one:0.5"], catalog) == [
        str((tmp_path / "one.safetensors").resolve()) + ":0.5"
    ]
    with pytest.raises(ValueError, match="does not exist"):
        lora_catalog({"x": str(tmp_path / "missing")}, None)
    with pytest.raises(ValueError, match="is not a directory"):
        lora_catalog({}, str(tmp_path / "one.safetensors"))
