"""Executors that forward to workers or services that something else started.

- :class:`ExternalDiffusionExecutor` (``external``): connects to workers launched by
  another system (a scheduler, a container platform) with ``omni-diffuse worker --listen``.
  It owns the connections, not the workers: ``shutdown`` disconnects and leaves them running.
- :class:`HTTPDiffusionExecutor` (``http``): forwards ``generate`` and health checks to an
  ``omni-diffuse serve`` endpoint (or any server speaking the same JSON API).

Both read their options from ``OmniDiffusionConfig.executor_config``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from multiprocessing.connection import Client
from typing import Any

from spmd_diffusion import envs
from spmd_diffusion.data import DiffusionOutput, OmniDiffusionConfig
from spmd_diffusion.distributed.protocol import (
    MessageKind,
    RpcMethod,
    RpcRequest,
    method_name,
    request_to_wire,
)
from spmd_diffusion.distributed.shm_channel import ShmChannel
from spmd_diffusion.distributed.transport import ChannelTransport
from spmd_diffusion.errors import SpmdDiffusionError
from spmd_diffusion.executor.diffusion_executor import DiffusionExecutor
from spmd_diffusion.executor.rpc_executor import RpcExecutor
from spmd_diffusion.request import OmniDiffusionRequest

AUTHKEY_ENV = envs.AUTHKEY
REMOTE = 2**62  # a channel threshold no message reaches: no shared memory across hosts


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"worker address must be HOST:PORT with a port in 1-65535, got {address!r}"
        )
    return host, int(port)


def authkey_from(config: dict[str, Any]) -> bytes:
    key = config.get("authkey") or envs.authkey()
    if not key:
        raise ValueError(
            f"set executor_config['authkey'] or ${AUTHKEY_ENV} (shared with the workers)"
        )
    return key.encode() if isinstance(key, str) else bytes(key)


class ExternalDiffusionExecutor(RpcExecutor):
    """Drives externally launched workers.

    ``executor_config``: ``worker_addresses`` (``["host:port", ...]`` in rank order) and
    ``authkey`` (or ``$SPMD_DIFFUSION_AUTHKEY``), the secret both sides share.
    """

    spmd = False

    @classmethod
    def planned_world_size(cls, od_config: OmniDiffusionConfig) -> int | None:
        addresses = od_config.executor_config.get("worker_addresses")
        return len(addresses) if isinstance(addresses, (list, tuple)) else None

    def _init_executor(self) -> None:
        self._open_calls()
        options = self.od_config.executor_config
        addresses = options.get("worker_addresses")
        if not addresses or not isinstance(addresses, (list, tuple)):
            raise ValueError("executor_config['worker_addresses'] must list the workers' HOST:PORT")
        authkey = authkey_from(options)
        channels = []
        for address in addresses:
            connection = Client(parse_address(address), authkey=authkey)
            channels.append(ShmChannel(connection, threshold=REMOTE))
        self.transport = ChannelTransport(channels)
        try:
            self.collective_rpc("check_health", timeout=self.od_config.rpc_timeout)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Disconnect; the workers keep running for the next client."""
        if getattr(self, "is_closed", True):
            return
        self.is_closed = True
        transport = getattr(self, "transport", None)
        if transport is None:
            return
        for channel in transport.channels:
            try:
                channel.send(request_to_wire(RpcRequest(MessageKind.DISCONNECT)))
                channel.recv()
            except (EOFError, OSError):
                pass
        transport.close()


class HTTPDiffusionExecutor(DiffusionExecutor):
    """Forwards generation to an HTTP endpoint speaking ``POST /v1/diffusion/generate``.

    ``executor_config``: ``base_url`` (default ``http://127.0.0.1:8000``) and ``api_key``
    (default ``$SPMD_DIFFUSION_API_KEY``), sent as a bearer token.
    Only ``generate`` and ``check_health`` cross HTTP; other worker methods are refused,
    because a server must not run arbitrary calls for its clients.
    """

    spmd = False

    def _init_executor(self) -> None:
        self.base_url = str(
            self.od_config.executor_config.get("base_url", "http://127.0.0.1:8000")
        ).rstrip("/")
        self.api_key = self.od_config.executor_config.get("api_key") or envs.api_key()

    def _request(self, path: str, payload: Any = None, timeout: float | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
                detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            except (ValueError, AttributeError):
                pass
            raise SpmdDiffusionError(
                f"{self.base_url}{path} answered {exc.code}: {detail}"
            ) from None
        except urllib.error.URLError as exc:
            raise SpmdDiffusionError(f"cannot reach {self.base_url}{path}: {exc.reason}") from None

    def execute_model(self, requests: list[OmniDiffusionRequest]) -> DiffusionOutput:
        payload = {"requests": [request.to_dict() for request in requests]}
        answer = self._request(
            "/v1/diffusion/generate", payload, timeout=self.od_config.generate_timeout
        )
        return DiffusionOutput.from_dict(answer)

    def collective_rpc(
        self,
        method: RpcMethod,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict[str, Any] | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        name = method_name(method)
        if name == "generate":
            output = self.execute_model(*args, **(kwargs or {}))
            return output if unique_reply_rank is not None else [output]
        if name == "check_health":
            answer = self._request("/health", timeout=timeout or self.od_config.rpc_timeout)
            return answer if unique_reply_rank is not None else [answer]
        raise NotImplementedError(
            f"HTTPDiffusionExecutor forwards only generate and check_health, not {name!r}"
        )

    def check_health(self) -> None:
        self.collective_rpc("check_health", unique_reply_rank=0)
