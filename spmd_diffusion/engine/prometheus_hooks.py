"""Prometheus metrics from the engine's hooks (``prometheus-client``, the ``serve`` extra).

Each instance has its own registry, so two engines in one process (tests, a server and a
batch job) never mix their numbers. ``serve`` shows it at ``/metrics``; ``generate
--metrics-port`` serves it on loopback.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (prometheus_client)

from __future__ import annotations

from spmd_diffusion.engine.hooks import BatchInfo, EngineHooks

# Requests of a few ms (tiny models, CPU) to minutes (big models, long queues).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class PrometheusHooks(EngineHooks):
    """Queue time, latency, batch size and step histograms; images, requests and failures;
    busy seconds per replica; requests waiting."""

    def __init__(self, registry: object | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        prefix = "spmd_diffusion"
        kwargs = {"registry": self.registry}
        self.queue_seconds = Histogram(
            f"{prefix}_queue_seconds",
            "Time requests waited for a replica",
            buckets=LATENCY_BUCKETS,
            **kwargs,
        )
        self.latency_seconds = Histogram(
            f"{prefix}_request_latency_seconds",
            "Time from a request's arrival to its images",
            buckets=LATENCY_BUCKETS,
            **kwargs,
        )
        self.batch_images = Histogram(
            f"{prefix}_batch_images",
            "Images per batch sent to a replica",
            buckets=BATCH_BUCKETS,
            **kwargs,
        )
        self.step_seconds = Histogram(
            f"{prefix}_step_seconds",
            "Duration of one denoising step",
            buckets=STEP_BUCKETS,
            **kwargs,
        )
        self.requests = Counter(
            f"{prefix}_requests", "Requests finished, by outcome", ["outcome"], **kwargs
        )
        self.images = Counter(f"{prefix}_images", "Images generated", **kwargs)
        self.busy_seconds = Counter(
            f"{prefix}_replica_busy_seconds",
            "Seconds each replica spent on batches",
            ["replica"],
            **kwargs,
        )
        self.waiting = Gauge(
            f"{prefix}_requests_waiting", "Requests queued for a replica", **kwargs
        )
        self.step_done = Gauge(
            f"{prefix}_replica_step",
            "Denoising steps done in the pipeline call a replica "
            "runs (0 when idle; updated a few times a second where progress is on)",
            ["replica"],
            **kwargs,
        )
        self.step_total = Gauge(
            f"{prefix}_replica_steps",
            "Denoising steps of the pipeline call a replica runs",
            ["replica"],
            **kwargs,
        )
        for outcome in ("ok", "failed", "cancelled"):
            self.requests.labels(outcome=outcome)
        self._running: set[str] = (
            set()
        )  # requests in batches: a cancellation of one is not a waiting one

    def request_queued(self, request_id: str, images: int, at: float) -> None:
        self.waiting.inc()

    def batch_started(self, batch: BatchInfo) -> None:
        self.waiting.dec(len(batch.request_ids))
        self.batch_images.observe(batch.images)
        self._running.update(batch.request_ids)

    def batch_progress(
        self, batch: BatchInfo, request_ids: tuple[str, ...], step: int, steps: int
    ) -> None:
        self.step_done.labels(replica=str(batch.replica)).set(step)
        self.step_total.labels(replica=str(batch.replica)).set(steps)

    def denoising_step(self, batch: BatchInfo, step: int, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def batch_finished(self, batch: BatchInfo, seconds: float, failed: int) -> None:
        self.busy_seconds.labels(replica=str(batch.replica)).inc(seconds)
        self.step_done.labels(replica=str(batch.replica)).set(0)
        self.step_total.labels(replica=str(batch.replica)).set(0)

    def request_done(self, request_id: str, images: int, queue_s: float, latency_s: float) -> None:
        self._running.discard(request_id)
        self.requests.labels(outcome="ok").inc()
        self.images.inc(images)
        self.queue_seconds.observe(queue_s)
        self.latency_seconds.observe(latency_s)

    def request_failed(self, request_id: str, error: str, latency_s: float) -> None:
        self._running.discard(request_id)
        self.requests.labels(outcome="failed").inc()
        self.latency_seconds.observe(latency_s)

    def request_cancelled(self, request_id: str, latency_s: float) -> None:
        self.requests.labels(outcome="cancelled").inc()
        if request_id in self._running:
            self._running.discard(request_id)
        else:
            self.waiting.dec()

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> object:
        """Serve these metrics over HTTP (loopback by default: they are read-only, but no
        listener is opened wider than asked)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
