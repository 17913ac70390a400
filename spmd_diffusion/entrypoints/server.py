"""The HTTP server (``omni-diffuse serve``): OpenAI-compatible images API plus the native API.

FastAPI + uvicorn (the ``serve`` extra) in front of an :class:`AsyncDiffusionEngine`, so
concurrent requests are batched dynamically and spread over every replica:

- ``POST /v1/images/generations``: OpenAI's images API (``prompt``, ``n``, ``size`` "WxH",
  ``response_format`` ``b64_json``, ``model``; extensions ``negative_prompt``,
  ``num_inference_steps``, ``guidance_scale``, ``true_cfg_scale``, ``seed``). The ``openai`` client's
  ``client.images.generate(...)`` works against it.
- ``POST /v1/images/edits``: OpenAI's multipart edit route (``image`` files, ``mask``,
  ``prompt``, ``n``, ``size`` and the same extensions plus ``strength``), served by an
  image-to-image or inpainting pipeline (:mod:`.http.edits`); ``client.images.edit(...)`` works.
- ``POST /v1/videos``, ``GET /v1/videos[/{id}[/content]]``, ``DELETE /v1/videos/{id}``:
  asynchronous video jobs with progress (:mod:`.http.videos`); ``client.videos`` works.
- ``GET /v1/models``: the one model served.
- ``POST /v1/diffusion/generate``: ``{"requests": [OmniDiffusionRequest.to_dict(), ...]}``
  -> ``DiffusionOutput.to_dict()`` (what :class:`HTTPDiffusionExecutor` speaks). Input
  images (``image``, ``mask_image``) come as ``{"format": "png", "data": <base64>}`` or a
  ``data:image/...;base64,`` URI; a file path is refused (the server reads no files).
  ``"stream": true`` answers server-sent events (queued, started, step k/n, done).
  ``lora`` (every route) names adapters from the server's allow-list (:mod:`.http.loras`),
  never a path.
- ``GET /health``: answers from the engine's own state, never waiting for it (200 ok, 503
  with the reason when the engine failed, is closing or was shut down). ``GET /metrics``:
  Prometheus text.

With an API key (``--api-key`` or ``$SPMD_DIFFUSION_API_KEY``) every route but ``/health``
needs ``Authorization: Bearer <key>`` (``/metrics`` too: request counts and queue depths are
the operator's business); a server bound beyond loopback refuses to start without one.
Every client mistake is a 4xx and every failure a JSON body in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``). A client that disconnects cancels
its requests: waiting ones are dropped, running ones stop at the next step boundary. Bodies are capped, and so are requests per call and
the queue (503 when full, so a flood cannot grow the server's memory without bound).
"""

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.engine.prometheus_hooks import PrometheusHooks
from spmd_diffusion.entrypoints.http.errors import ApiError, invalid, parse_size, png_base64
from spmd_diffusion.entrypoints.http.state import (
    OpenAIImageFields,
    ServerLimits,
    ServingState,
    images_request_model,
    refuse_url,
    settings_of,
    unable_to_serve,
)
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.image_inputs import IMAGE_FIELDS

__all__ = [
    "ApiError",
    "DiffusionServer",
    "ServerLimits",
    "build_app",
    "check_listen_address",
    "images_request_model",
    "parse_size",
    "serve",
]

logger = logging.getLogger(__name__)

GENERATE_PATH = "/v1/diffusion/generate"
LISTEN_BACKLOG = 2048  # 5 (http.server's default) reset 2-3 of 20 concurrent clients here


def merge_outputs(outputs: list[DiffusionOutput]) -> DiffusionOutput:
    """One output holding every request's results, in order."""
    merged = DiffusionOutput()
    for output in outputs:
        merged.request_ids += output.request_ids
        merged.images += output.images
        merged.errors += output.errors
        merged.seeds += output.seeds
        merged.metadata += output.metadata
    return merged


def build_app(
    engine: AsyncDiffusionEngine,
    model_name: str,
    api_key: str | None = None,
    metrics: PrometheusHooks | None = None,
    limits: ServerLimits = ServerLimits(),
    loras: dict[str, str] | None = None,
) -> Any:
    """The FastAPI application serving ``engine``; ``loras``: the adapters a request may name
    (name -> path, see :mod:`.http.loras`)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="spmd_diffusion", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServingState(engine, model_name, api_key, limits, loras)
    check_key = state.check_key
    started = time.time()
    metrics = metrics or PrometheusHooks()
    from prometheus_client import Counter

    http_requests = Counter(
        "spmd_diffusion_http_requests",
        "HTTP requests by route and status",
        ["route", "status"],
        registry=metrics.registry,
    )

    class OpenAIImagesRequest(OpenAIImageFields):
        """OpenAI's ``images.generate`` body (FastAPI parses it: the prompt limit is a bound)."""

        prompt: str = Field(min_length=1, max_length=limits.max_prompt_chars)
        style: str | None = None

    ImagesRequest = images_request_model(OpenAIImagesRequest, limits)

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            ApiError(
                exc.status_code,
                str(exc.detail),
                "not_found_error" if exc.status_code == 404 else "invalid_request_error",
            )
        )

    @app.exception_handler(Exception)
    async def on_crash(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))

    async def read_json(request: Request) -> Any:
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            return json.loads(body)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from None

    @app.get("/health")
    async def health() -> Response:
        problem = unable_to_serve(engine)
        if problem is not None:
            return Response(
                json.dumps({"status": "error", "error": problem}),
                503,
                media_type="application/json",
            )
        return Response(json.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/metrics", dependencies=[Depends(check_key)])
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": int(started),
                    "owned_by": "spmd_diffusion",
                }
            ],
        }

    @app.post("/v1/images/generations", dependencies=[Depends(check_key)])
    async def images_generations(body: ImagesRequest, request: Request) -> dict[str, Any]:
        state.check_model(body.model)
        if state.video_model:
            raise ApiError(
                400,
                f"{model_name!r} makes videos, which the images API cannot return: use "
                f"POST /v1/videos (a video job), or POST {GENERATE_PATH}, whose images are lists "
                "of frames",
                param="model",
            )
        refuse_url(body)
        height, width = parse_size(body.size)
        try:
            item = OmniDiffusionRequest(
                prompt=body.prompt,
                height=height,
                width=width,
                num_images_per_prompt=body.n,
                lora=state.lora_specs(body.lora),
                **settings_of(body),
            )
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        state.prepared([item])
        (output,) = await state.run_all(request, [item])
        if output.errors[0] is not None:
            raise ApiError(500, output.errors[0], "server_error")
        encoded = await asyncio.to_thread(lambda: [png_base64(image) for image in output.images[0]])
        return {"created": int(time.time()), "data": [{"b64_json": data} for data in encoded]}

    from spmd_diffusion.entrypoints.http.edits import edits_router
    from spmd_diffusion.entrypoints.http.videos import VideoJobs, videos_router

    app.include_router(edits_router(state))
    video_jobs = VideoJobs(state)
    app.include_router(videos_router(state, video_jobs))
    app.state.video_jobs = video_jobs

    @app.post(GENERATE_PATH, dependencies=[Depends(check_key)])
    async def native_generate(request: Request) -> Response:
        body = await read_json(request)
        if (
            not isinstance(body, dict)
            or "requests" not in body
            or not set(body) <= {"requests", "stream"}
        ):
            raise ApiError(
                400,
                'body must be {"requests": [<request>, ...]}, optionally "stream": true, '
                "and nothing else",
            )
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        items = body["requests"]
        if not isinstance(items, list) or not items:
            raise ApiError(400, '"requests" must be a non-empty list of requests')
        if len(items) > limits.max_requests_per_call:
            raise ApiError(
                400,
                f"{len(items)} requests in one call; the limit is {limits.max_requests_per_call}",
            )
        requests = []
        for position, item in enumerate(items):
            if not isinstance(item, dict):
                raise ApiError(400, f"requests[{position}] must be an object")
            try:
                requests.append(OmniDiffusionRequest.from_dict(item))
            except (TypeError, ValueError) as exc:
                raise ApiError(400, f"requests[{position}]: {exc}") from None
            for name in IMAGE_FIELDS:
                if isinstance(getattr(requests[-1], name), str):
                    raise ApiError(
                        400,
                        f"requests[{position}]: {name} must be the image itself, "
                        '{"format": "png", "data": <base64>} or a data: URI: the server reads no files',
                        param=name,
                    )
            # A client names adapters the server offers: it must not make the server read its
            # files or download from the hub.
            requests[-1].lora = state.lora_specs(requests[-1].lora, f"requests[{position}]: ")
        state.prepared(requests)
        if body.get("stream"):
            state.check_room(len(requests))
            return StreamingResponse(
                event_stream(state, requests),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        merged = merge_outputs(state.named(await state.run_all(request, requests)))
        text = await asyncio.to_thread(lambda: json.dumps(merged.to_dict(), allow_nan=False))
        return Response(text, media_type="application/json")

    return GuardMiddleware(app, limits.max_body_bytes, http_requests)


async def event_stream(state: ServingState, requests: list[OmniDiffusionRequest]) -> Any:
    """Server-sent events of ``requests``, interleaved as they happen: ``queued``, ``started``
    (replica, batch), ``step`` (k of n, a few a second), then ``done`` with that request's
    output (``DiffusionOutput.to_dict()``) or ``failed`` with the error; ``data: [DONE]`` last.
    A client that goes away cancels every request of the stream, started ones included."""
    events: asyncio.Queue = asyncio.Queue()

    async def follow(item: OmniDiffusionRequest) -> None:
        try:
            async for event in state.engine.generate_events(item):
                await events.put(event)
        except Exception as exc:  # noqa: BLE001 - e.g. the engine closed: that request failed
            await events.put({"event": "failed", "request_id": item.request_id, "error": str(exc)})

    tasks = [asyncio.ensure_future(follow(item)) for item in requests]
    open_requests = len(requests)
    try:
        while open_requests:
            event = await events.get()
            if event["event"] in ("done", "failed"):
                open_requests -= 1
            if "output" in event:
                output = event.pop("output")
                if output.errors and output.errors[0] is not None:
                    event.update(event="failed", error=output.errors[0])
                else:
                    event["output"] = await asyncio.to_thread(
                        lambda: state.named([output])[0].to_dict()
                    )
            text = await asyncio.to_thread(json.dumps, event, allow_nan=False)
            yield f"data: {text}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()


class GuardMiddleware:
    """Pure ASGI (a BaseHTTPMiddleware would hide client disconnects from the routes):
    refuses declared bodies over the cap before reading them, cuts chunked ones at the cap,
    and counts requests by route and status."""

    def __init__(self, app: Any, max_body_bytes: int, counter: Any) -> None:
        self.app, self.max_body_bytes, self.counter = app, max_body_bytes, counter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            error = ApiError(413, f"request body over {self.max_body_bytes} bytes")
            await self._send_error(send, error)
            self.counter.labels(route="other", status="413").inc()
            return
        received = [0]

        async def capped_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body_bytes:
                    raise ApiError(413, f"request body over {self.max_body_bytes} bytes")
            return message

        async def watched_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.counter.labels(route=route, status=str(status[0])).inc()

    @staticmethod
    async def _send_error(send: Callable, error: ApiError) -> None:
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def listen_socket(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), backlog=LISTEN_BACKLOG)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_address(host: str, api_key: str | None) -> None:
    """Only loopback may go without a key: anyone who reaches the port could make the job's
    owner pay for their images (and see what others asked for)."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"listening on {host} needs an API key (--api-key or $SPMD_DIFFUSION_API_KEY); "
            "without one the server listens on 127.0.0.1 only"
        )


class DiffusionServer:
    """A bound server: ``serve_forever()`` in this thread, or ``start()`` in a background one;
    ``shutdown()`` stops it (finishing the requests in flight) and ``server_close()`` frees it."""

    def __init__(
        self,
        engine: AsyncDiffusionEngine,
        sock: socket.socket,
        api_key: str | None = None,
        model_name: str | None = None,
        limits: ServerLimits = ServerLimits(),
        loras: dict[str, str] | None = None,
    ) -> None:
        import uvicorn

        self.async_engine = engine
        self.engine = engine.engine
        self.metrics = engine.metrics_hooks()
        self.app = build_app(
            engine, model_name or engine.od_config.model, api_key, self.metrics, limits, loras
        )
        self.socket = sock
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            timeout_keep_alive=5,
            timeout_graceful_shutdown=30,
            access_log=False,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self) -> "DiffusionServer":
        self._thread = threading.Thread(
            target=self.serve_forever, name="spmd-diffusion-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Stop serving (from another thread), after the requests in flight are answered."""
        self.server.should_exit = True
        self._stopped.wait(timeout=60)

    def server_close(self) -> None:
        self.socket.close()
        self.async_engine.close_sync()
        video_jobs = getattr(getattr(self.app, "app", None), "state", None)
        if video_jobs is not None and hasattr(video_jobs, "video_jobs"):
            video_jobs.video_jobs.close()


def serve(
    engine: DiffusionEngine | AsyncDiffusionEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    limits: ServerLimits = ServerLimits(),
    sock: socket.socket | None = None,
    loras: dict[str, str] | None = None,
) -> DiffusionServer:
    """Bind the server (port 0 picks a free port; or pass a bound ``sock``); call
    ``serve_forever()`` or ``start()``. Beyond loopback an ``api_key`` is required. A plain
    :class:`DiffusionEngine` is wrapped in an async engine (and not closed by it). ``loras``:
    the adapters requests may name (name -> path; see ``http/loras.py``)."""
    if sock is None:
        check_listen_address(host, api_key)
        sock = listen_socket(host, port)
    if isinstance(engine, DiffusionEngine):
        engine = AsyncDiffusionEngine(engine.od_config, engine=engine)
    return DiffusionServer(engine, sock, api_key, model_name, limits, loras)
