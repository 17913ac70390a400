"""The HTTP server (``omni-diffuse serve``): OpenAI-compatible images API plus the native API.

FastAPI + uvicorn (the ``serve`` extra) in front of an :class:`AsyncDiffusionEngine`, so
concurrent requests are batched dynamically and spread over every replica:

- ``POST /v1/images/generations``: OpenAI's images API (``prompt``, ``n``, ``size`` "WxH",
  ``response_format`` ``b64_json``, ``model``; extensions ``negative_prompt``,
  ``num_inference_steps``, ``guidance_scale``, ``true_cfg_scale``, ``seed``). The ``openai``
  client's ``client.images.generate(...)`` works against it.
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
its requests: waiting ones are dropped, running ones stop at the next step boundary. Bodies
are capped, and so are requests per call and the queue (503 when full, so a flood cannot
grow the server's memory without bound).

Each API is a module-level router in ``http/`` (``status``, ``images``, ``edits``, ``videos``,
``native``); they find the server's :class:`ServingState` in ``app.state.serving``. This
module assembles them, maps errors to OpenAI's shape, guards bodies and binds the socket.
"""

import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.engine.prometheus_hooks import PrometheusHooks
from spmd_diffusion.entrypoints.http import edits, images, native, status, videos
from spmd_diffusion.entrypoints.http.errors import ApiError, invalid, parse_size
from spmd_diffusion.entrypoints.http.native import GENERATE_PATH
from spmd_diffusion.entrypoints.http.state import ServerLimits, ServingState, images_request_model
from spmd_diffusion.entrypoints.http.videos import VideoJobs

__all__ = [
    "GENERATE_PATH",
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

DEFAULT_LIMITS = ServerLimits()
ROUTERS = (status.router, images.router, edits.router, videos.router, native.router)
LISTEN_BACKLOG = 2048  # 5 (http.server's default) reset 2-3 of 20 concurrent clients here


def build_app(
    engine: AsyncDiffusionEngine,
    model_name: str,
    api_key: str | None = None,
    metrics: PrometheusHooks | None = None,
    limits: ServerLimits = DEFAULT_LIMITS,
    loras: dict[str, str] | None = None,
) -> Any:
    """The FastAPI application serving ``engine``: the routers of ``http/`` over one
    :class:`ServingState` in ``app.state.serving``; ``loras``: the adapters a request may name
    (name -> path, see :mod:`.http.loras`)."""
    app = FastAPI(title="spmd_diffusion", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServingState(engine, model_name, api_key, limits, loras, metrics)
    state.video_jobs = VideoJobs(state)
    app.state.serving = state
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
    for router in ROUTERS:
        app.include_router(router)
    http_requests = Counter(
        "spmd_diffusion_http_requests",
        "HTTP requests by route and status",
        ["route", "status"],
        registry=state.metrics.registry,
    )
    return GuardMiddleware(app, limits.max_body_bytes, http_requests)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(invalid(exc.errors()))


async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(exc.status_code, str(exc.detail), kind))


async def on_crash(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request failed")
    return error_response(ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))


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
        limits: ServerLimits = DEFAULT_LIMITS,
        loras: dict[str, str] | None = None,
    ) -> None:
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
        self.app.app.state.serving.video_jobs.close()


def serve(
    engine: DiffusionEngine | AsyncDiffusionEngine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    limits: ServerLimits = DEFAULT_LIMITS,
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
