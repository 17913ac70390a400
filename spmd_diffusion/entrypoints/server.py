"""A small HTTP front end for an engine: the API that HTTPDiffusionExecutor talks to.

- ``POST /v1/diffusion/generate`` takes ``{"requests": [OmniDiffusionRequest.to_dict(), ...]}``
  and answers ``DiffusionOutput.to_dict()`` for all of them, in order.
- ``GET /health`` answers 200 ``{"status": "ok"}`` or 503 with the error.
- ``GET /metrics`` answers Prometheus text counters.

The engine runs one call at a time (a lock); HTTP handling is threaded so health checks
answer while a batch is generating.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.engine.diffusion_engine import DiffusionEngine
from spmd_diffusion.request import OmniDiffusionRequest

logger = logging.getLogger(__name__)

GENERATE_PATH = "/v1/diffusion/generate"
MAX_BODY_BYTES = 64 << 20


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


class Metrics:
    """Counters shown at /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.http_requests = 0
        self.generated_requests = 0
        self.failed_requests = 0
        self.images = 0
        self.generate_seconds = 0.0

    def record(self, output: DiffusionOutput, seconds: float) -> None:
        with self.lock:
            self.generated_requests += len(output.request_ids)
            self.failed_requests += sum(error is not None for error in output.errors)
            self.images += sum(len(images) for images in output.images)
            self.generate_seconds += seconds

    def render(self) -> str:
        rows = [
            ("spmd_diffusion_http_requests_total", self.http_requests),
            ("spmd_diffusion_requests_total", self.generated_requests),
            ("spmd_diffusion_request_errors_total", self.failed_requests),
            ("spmd_diffusion_images_total", self.images),
            ("spmd_diffusion_generate_seconds_total", round(self.generate_seconds, 6)),
        ]
        lines = []
        for name, value in rows:
            lines += [f"# TYPE {name} counter", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class DiffusionHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: DiffusionEngine) -> None:
        self.engine = engine
        self.engine_lock = threading.Lock()
        self.metrics = Metrics()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: DiffusionHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if content_type == "application/json" else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        with self.server.metrics.lock:
            self.server.metrics.http_requests += 1
        if self.path == "/health":
            try:
                with self.server.engine_lock:
                    self.server.engine.check_health()
            except Exception as exc:  # noqa: BLE001 - report, do not crash the server
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "error": str(exc)})
                return
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif self.path == "/metrics":
            self._send(HTTPStatus.OK, self.server.metrics.render(), "text/plain; version=0.0.4")
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        with self.server.metrics.lock:
            self.server.metrics.http_requests += 1
        if self.path != GENERATE_PATH:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
            return
        try:
            requests = self._parse_requests()
        except ValueError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        start = time.perf_counter()
        try:
            with self.server.engine_lock:
                outputs = self.server.engine.generate(requests)
        except Exception as exc:  # noqa: BLE001 - the client gets the reason
            logger.exception("generate failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"})
            return
        merged = merge_outputs(outputs)
        merged.timings = {"total_s": time.perf_counter() - start}
        self.server.metrics.record(merged, merged.timings["total_s"])
        self._send(HTTPStatus.OK, merged.to_dict())

    def _parse_requests(self) -> list[OmniDiffusionRequest]:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY_BYTES:
            raise ValueError(f"request body must be 1..{MAX_BODY_BYTES} bytes of JSON")
        try:
            body = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON: {exc}") from None
        items = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ValueError('body must be {"requests": [<request>, ...]} with at least one request')
        return [OmniDiffusionRequest.from_dict(item) for item in items]


def serve(engine: DiffusionEngine, host: str = "127.0.0.1", port: int = 8000) -> DiffusionHTTPServer:
    """Bind the server (port 0 picks a free port); call ``serve_forever()`` on the result."""
    return DiffusionHTTPServer((host, port), engine)
