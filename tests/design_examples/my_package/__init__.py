"""The custom executors of the design document, written the way it tells users to.

``MyCustomExecutor`` follows "Creating a Custom Executor" step by step (subclass,
``_init_executor``, ``collective_rpc``, ``check_health``, ``shutdown``); its workers are
stand-ins for a user's own inference system, so it needs no model (``MyModel``).
``HTTPDiffusionExecutor`` is the document's "Remote HTTP Inference Server" example as written.
"""

# ruff: noqa: PLC0415 - optional extras load only where used (requests)

from __future__ import annotations

from PIL import Image

from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig  # noqa: F401 - as in the guide
from spmd_diffusion.distributed.protocol import collect_replies, run_rpc
from spmd_diffusion.executor import DiffusionExecutor
from spmd_diffusion.request import OmniDiffusionRequest  # noqa: F401 - as in the guide


class EchoWorker:
    """A user's own worker: answers test_method and makes flat grey images."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def test_method(self) -> str:
        return f"ok from {self.rank}"

    def generate(self, requests):
        return DiffusionOutput(
            request_ids=[r.request_id for r in requests],
            images=[
                [Image.new("RGB", (r.width or 64, r.height or 64), (128, 128, 128))]
                for r in requests
            ],
            rank=self.rank,
        )

    def check_health(self) -> str:
        return "ok"


class MyCustomExecutor(DiffusionExecutor):
    """My custom executor implementation."""

    def _init_executor(self) -> None:
        """Initialize your custom resources."""
        self.workers = [EchoWorker(rank) for rank in range(self.od_config.num_gpus)]
        self.closed = False

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        unique_reply_rank: int | None = None,
    ):
        """Forward RPC calls to your execution system."""
        replies = [run_rpc(worker, worker.rank, method, args, kwargs) for worker in self.workers]
        return collect_replies(method, replies, unique_reply_rank)

    def check_health(self) -> None:
        """Check if your system is healthy."""
        if self.closed:
            raise RuntimeError("closed")

    def shutdown(self) -> None:
        """Clean up resources."""
        self.closed = True


class HTTPDiffusionExecutor(DiffusionExecutor):
    """Execute via remote HTTP API."""

    def _init_executor(self) -> None:
        import requests

        self.session = requests.Session()
        self.base_url = self.od_config.executor_config.get(
            "base_url", "http://inference-server:8000"
        )

    def execute_model(self, requests):
        payload = {"requests": [r.to_dict() for r in requests]}
        response = self.session.post(
            f"{self.base_url}/v1/diffusion/generate", json=payload, timeout=300
        )
        return DiffusionOutput.from_dict(response.json())
