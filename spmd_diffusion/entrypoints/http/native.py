"""``POST /v1/diffusion/generate``: the native API, ``{"requests": [OmniDiffusionRequest.to_dict(),
...]}`` -> ``DiffusionOutput.to_dict()`` (what :class:`HTTPDiffusionExecutor` speaks). Input
images (``image``, ``mask_image``) come as ``{"format": "png", "data": <base64>}`` or a
``data:image/...;base64,`` URI; a file path is refused (the server reads no files).
``"stream": true`` answers server-sent events (queued, started, step k/n, done)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from spmd_diffusion.data import DiffusionOutput
from spmd_diffusion.entrypoints.http.errors import ApiError
from spmd_diffusion.entrypoints.http.state import Serving, ServingState, require_key
from spmd_diffusion.request import OmniDiffusionRequest
from spmd_diffusion.utils.image_inputs import IMAGE_FIELDS

GENERATE_PATH = "/v1/diffusion/generate"

router = APIRouter(dependencies=[Depends(require_key)])


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


async def read_json(request: Request, max_body_bytes: int) -> Any:
    """The body as JSON (a 400 saying why it is not, 413 past the cap)."""
    body = await request.body()
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body over {max_body_bytes} bytes")
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None


@router.post(GENERATE_PATH)
async def native_generate(request: Request, state: Serving) -> Response:
    body = await read_json(request, state.limits.max_body_bytes)
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
    if len(items) > state.limits.max_requests_per_call:
        raise ApiError(
            400,
            f"{len(items)} requests in one call; the limit is {state.limits.max_requests_per_call}",
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
                        lambda output=output: state.named([output])[0].to_dict()
                    )
            text = await asyncio.to_thread(json.dumps, event, allow_nan=False)
            yield f"data: {text}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
