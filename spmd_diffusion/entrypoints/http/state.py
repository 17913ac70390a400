"""What every route of one server shares: the engine, the model's name, the key, the limits,
and the steps each request goes through (key, room in the queue, the CLI's checks, running
with cancellation when the client goes away). The routers are module-level and find the
server's :class:`ServingState` in the app's state (``app.state.serving``) through the
:func:`serving` and :func:`require_key` dependencies."""

# ruff: noqa: PLC0415 - the loader, the job checks and the adapter catalog are imported when a
# request first needs them (they import this module's neighbours)

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.requests import Request

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.engine.async_engine import AsyncDiffusionEngine
from spmd_diffusion.engine.prometheus_hooks import PrometheusHooks
from spmd_diffusion.entrypoints.http.errors import ApiError, invalid
from spmd_diffusion.errors import ExecutorClosedError
from spmd_diffusion.models.loader import makes_video
from spmd_diffusion.request import MAX_PROMPT_CHARS, OmniDiffusionRequest
from spmd_diffusion.request_settings import HTTP_SETTINGS

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server."""

    max_body_bytes: int = 64 << 20
    max_requests_per_call: int = 256
    max_queued_requests: int = 4096
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_video_jobs: int = 64  # video jobs kept (queued, running or finished and not yet fetched)
    video_job_ttl_s: float = 3600.0  # a finished job's file is deleted this long after it finished


class OpenAIImageFields(BaseModel):
    """The fields OpenAI's ``images.generate`` and ``images.edit`` share; the diffusers
    settings are added as extensions by :func:`images_request_model`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    quality: str | None = None  # accepted for compatibility; a diffusers pipeline has no such knob
    user: str | None = None
    lora: str | list[str] | None = None  # adapters this server offers, NAME[:SCALE]


def refuse_url(body: Any) -> None:
    if body.response_format == "url":
        raise ApiError(
            400,
            "response_format url is not supported: images are returned as b64_json",
            param="response_format",
        )


def images_request_model(base: type, limits: ServerLimits) -> type:
    """``base`` with a field per HTTP setting, typed and bounded as the declaration says (texts
    also within the server's prompt limit)."""
    types = {"int": int, "float": float, "text": str}
    fields: dict[str, Any] = {}
    for setting in HTTP_SETTINGS:
        bounds: dict[str, Any] = {}
        if setting.minimum is not None:
            bounds["gt" if setting.open_minimum else "ge"] = setting.minimum
        if setting.maximum is not None:
            bounds["le"] = setting.maximum
        if setting.kind == "float":
            bounds["allow_inf_nan"] = False
        if setting.max_length is not None:
            bounds["max_length"] = min(setting.max_length, limits.max_prompt_chars)
        fields[setting.http] = (
            types[setting.kind] | None,
            Field(None, description=setting.help, **bounds),
        )
    return create_model(base.__name__.removeprefix("OpenAI"), __base__=base, **fields)


def settings_of(body: Any) -> dict[str, Any]:
    """The request fields an OpenAI-style body sets through its extension fields."""
    return {setting.field: getattr(body, setting.http) for setting in HTTP_SETTINGS}


def unable_to_serve(engine: AsyncDiffusionEngine) -> str | None:
    """Why the engine cannot take a request now (None: it can), from its own state only:
    a health probe never waits behind a running batch."""
    if engine.failure is not None:
        return f"the engine failed: {engine.failure}"
    if engine.closing:
        return "the engine is closing"
    if engine.engine.executor.is_closed:
        return "the engine is shut down"
    if getattr(engine.engine.executor, "is_failed", False):
        return "the executor failed"
    return None


def serving(request: Request) -> ServingState:
    """A FastAPI dependency: the state of the server this request reached."""
    return request.app.state.serving


def require_key(request: Request) -> None:
    """A FastAPI dependency: ``Authorization: Bearer <key>`` when the server has a key."""
    serving(request).check_key(request)


Serving = Annotated["ServingState", Depends(serving)]


class ServingState:
    """One server's engine, name, key and limits, and the request steps its routes share."""

    def __init__(
        self,
        engine: AsyncDiffusionEngine,
        model_name: str,
        api_key: str | None,
        limits: ServerLimits,
        loras: dict[str, str] | None = None,
        metrics: PrometheusHooks | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits
        self.loras = dict(loras or {})  # the adapters a request may name: name -> path
        self.metrics = metrics or PrometheusHooks()
        self.started = time.time()
        self.video_jobs: Any = None  # the server's VideoJobs (http/videos.py), set by build_app
        config = getattr(engine, "od_config", None)
        self.video_model = config is not None and makes_video(config.model, config.model_class_name)
        self._accepted: list[Any] = []  # the pipeline's call arguments, looked up once

    def check_key(self, request: Request) -> None:
        """A FastAPI dependency: ``Authorization: Bearer <key>`` when the server has a key."""
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )

    def lora_specs(self, value: Any, where: str = "") -> list[str] | None:
        """A client's ``lora`` names as the worker's specs (400 for a name not offered)."""
        from spmd_diffusion.entrypoints.http.loras import resolve_loras

        try:
            return resolve_loras(value, self.loras)
        except ValueError as exc:
            raise ApiError(400, f"{where}{exc}", param="lora") from None

    def named(self, outputs: list[DiffusionOutput]) -> list[DiffusionOutput]:
        """``outputs`` with adapters named by their catalog names, not the server's paths."""
        from spmd_diffusion.entrypoints.http.loras import name_loras

        for output in outputs:
            if output.metadata:
                name_loras(output.metadata, self.loras)
        return outputs

    def validated(self, model: type, fields: dict[str, Any]) -> Any:
        """``fields`` (a form's or a JSON body's) as ``model``, its prompt within the limit and
        its model this server's; a 400 otherwise."""
        try:
            body = model.model_validate(fields)
        except ValidationError as exc:
            raise invalid(exc.errors()) from None
        self.check_body(body)
        return body

    def check_body(self, body: Any) -> None:
        """A parsed body's prompt within this server's limit and its model this server's."""
        if len(body.prompt) > self.limits.max_prompt_chars:
            raise ApiError(
                400, f"prompt: at most {self.limits.max_prompt_chars} characters", param="prompt"
            )
        self.check_model(body.model)

    def check_model(self, name: str | None) -> None:
        if name not in (None, self.model_name):
            raise ApiError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                code="model_not_found",
                param="model",
            )

    def check_room(self, count: int) -> None:
        engine = self.engine
        if engine.failure is not None:
            raise ApiError(503, f"the engine failed: {engine.failure}", "server_error")
        if engine.queued + count > self.limits.max_queued_requests:
            raise ApiError(
                503,
                f"the server is full ({engine.queued} requests waiting); retry later",
                "server_error",
                code="overloaded",
            )

    def pipeline_call(self) -> tuple[str, set[str]] | None:
        """The loaded pipeline's class name and call arguments (None: not known before loading)."""
        if not self._accepted:
            from spmd_diffusion.models.loader import call_arguments

            config = self.engine.engine.od_config
            self._accepted.append(call_arguments(config.model, config.model_class_name))
        return self._accepted[0]

    def needs_mask(self) -> bool:
        from spmd_diffusion.jobs.generate import required_inputs

        call = self.pipeline_call()
        return call is not None and "mask_image" in required_inputs(call[0])

    def prepared(self, requests: list[OmniDiffusionRequest]) -> None:
        """Every request checked before any is queued: limits, duplicate ids, and what the
        CLI checks before loading (inputs the pipeline takes or needs, extra arguments it
        names, a sequence split that divides), so a mistake is a 400, not an error in a 200."""
        from spmd_diffusion.jobs.generate import check_pipeline_takes, check_sequence_split

        config = self.engine.engine.od_config
        try:
            self.engine.engine.prepare(requests)
            for position, item in enumerate(requests):
                try:
                    check_pipeline_takes(item, config, self._accepted)
                    check_sequence_split(item, config)
                except ValueError as exc:
                    where = f"requests[{position}]: " if len(requests) > 1 else ""
                    raise ValueError(f"{where}{exc}") from None
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None

    async def run_all(
        self, request: Request, requests: list[OmniDiffusionRequest]
    ) -> list[DiffusionOutput]:
        """Every request's output; a client that goes away cancels its requests."""
        self.check_room(len(requests))
        tasks = [asyncio.ensure_future(self.engine.generate(item)) for item in requests]
        everything = asyncio.gather(*tasks)
        everything.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())
        try:
            while True:
                done, _ = await asyncio.wait({everything}, timeout=DISCONNECT_POLL_S)
                if done:
                    return everything.result()
                if await request.is_disconnected():
                    logger.info("client went away: cancelling %d request(s)", len(tasks))
                    everything.cancel()
                    raise ApiError(499, "client closed the request")
        except ValueError as exc:  # e.g. a request id already running
            raise ApiError(400, str(exc)) from None
        except ExecutorClosedError as exc:
            raise ApiError(503, str(exc), "server_error") from None
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
