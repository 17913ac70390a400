"""``POST /v1/images/generations``: OpenAI's images API (``prompt``, ``n``, ``size`` "WxH",
``response_format`` ``b64_json``, ``model``; the diffusers settings as extension fields);
the ``openai`` client's ``client.images.generate(...)`` works against it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from spmd_diffusion.entrypoints.http.errors import ApiError, parse_size, png_base64
from spmd_diffusion.entrypoints.http.native import GENERATE_PATH
from spmd_diffusion.entrypoints.http.state import (
    OpenAIImageFields,
    ServerLimits,
    Serving,
    images_request_model,
    refuse_url,
    require_key,
    settings_of,
)
from spmd_diffusion.request import MAX_PROMPT_CHARS, OmniDiffusionRequest

GENERATIONS_PATH = "/v1/images/generations"


class OpenAIImagesRequest(OpenAIImageFields):
    """OpenAI's ``images.generate`` body (FastAPI parses it; a server's own, lower prompt limit
    is checked by ``ServingState.check_body``)."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    style: str | None = None


ImagesRequest = images_request_model(OpenAIImagesRequest, ServerLimits())
router = APIRouter(dependencies=[Depends(require_key)])


@router.post(GENERATIONS_PATH)
async def images_generations(
    body: ImagesRequest,  # type: ignore[valid-type]
    request: Request,
    state: Serving,
) -> dict[str, Any]:
    state.check_body(body)
    if state.video_model:
        raise ApiError(
            400,
            f"{state.model_name!r} makes videos, which the images API cannot return: use "
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
