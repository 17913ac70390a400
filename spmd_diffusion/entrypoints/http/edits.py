"""``POST /v1/images/edits``: OpenAI's multipart image-edit route, served by the loaded
image-to-image or inpainting pipeline (the ``openai`` client's ``images.edit`` works).

Form fields: ``image`` (one or more files; ``image[]`` as the client names a list),
``mask`` (optional), ``prompt``, ``n``, ``size``, ``response_format`` ``b64_json``, ``model``,
plus this server's extension fields (``negative_prompt``, ``num_inference_steps``,
``guidance_scale``, ``strength``, ``seed``, ...). Several images are several edits of the same
prompt, ``n`` each, answered in order. A mask follows OpenAI's convention when it has an alpha
channel (fully transparent = edit there) and diffusers' otherwise (white = edit); without a
mask, an inpainting pipeline takes the image's own transparency as the mask. A text-to-image
pipeline answers a 400 naming what to load.
"""

# ruff: noqa: PLC0415 - Pillow is imported only when a mask has to be converted

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from spmd_diffusion.entrypoints.http.errors import ApiError, parse_size, png_base64
from spmd_diffusion.entrypoints.http.state import (
    OpenAIImageFields,
    ServerLimits,
    Serving,
    ServingState,
    images_request_model,
    refuse_url,
    require_key,
    settings_of,
)
from spmd_diffusion.request import OmniDiffusionRequest

EDITS_PATH = "/v1/images/edits"
MAX_EDIT_IMAGES = 16
IMAGE_KEYS = ("image", "image[]")


class OpenAIEditsRequest(OpenAIImageFields):
    """OpenAI's ``images.edit`` text fields (the files come apart: see :func:`read_form`)."""


def encoded(data: bytes) -> dict[str, Any]:
    """Uploaded bytes as a request's image input (the format is whatever Pillow finds)."""
    return {"format": "upload", "data": base64.b64encode(data).decode("ascii")}


def has_alpha(image: Any) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )


def mask_from_alpha(data: bytes) -> bytes | None:
    """OpenAI's mask convention (alpha 0 = edit here) as diffusers' (white = edit), or None
    when the image has no alpha channel."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        if not has_alpha(image):
            return None
        mask = ImageOps.invert(image.convert("RGBA").getchannel("A"))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


async def read_form(request: Request) -> tuple[dict[str, str], list[bytes], bytes | None]:
    """The text fields, the image files and the mask file of a multipart edit request."""
    try:
        form = await request.form(max_files=MAX_EDIT_IMAGES + 1, max_fields=64)
    except Exception as exc:  # noqa: BLE001 - python-multipart's and starlette's parse errors alike
        raise ApiError(400, f"the body is not a valid multipart form: {exc}") from None
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key in IMAGE_KEYS:
                images.append(await value.read())
            elif key == "mask" and mask is None:
                mask = await value.read()
            else:
                raise ApiError(
                    400, f"unexpected file field {key!r} (image and mask only)", param=key
                )
        elif key in fields or key in IMAGE_KEYS or key == "mask":
            raise ApiError(
                400,
                f"{key} must be given once, as "
                f"{'a file' if key in (*IMAGE_KEYS, 'mask') else 'text'}",
                param=key,
            )
        else:
            fields[key] = value
    if not images:
        raise ApiError(
            400, "image is required: the picture to edit, as a file field", param="image"
        )
    if len(images) > MAX_EDIT_IMAGES:
        raise ApiError(400, f"{len(images)} images; the limit is {MAX_EDIT_IMAGES}", param="image")
    return fields, images, mask


EditsRequest = images_request_model(OpenAIEditsRequest, ServerLimits())
router = APIRouter(dependencies=[Depends(require_key)])


@router.post(EDITS_PATH)
async def images_edits(request: Request, state: Serving) -> dict[str, Any]:
    fields, images, mask = await read_form(request)
    body = state.validated(EditsRequest, fields)
    refuse_url(body)
    height, width = parse_size(body.size)
    items = await asyncio.to_thread(build_items, body, images, mask, height, width, state)
    state.prepared(items)
    outputs = await state.run_all(request, items)
    failed = next(
        (error for output in outputs for error in output.errors if error is not None), None
    )
    if failed is not None:
        raise ApiError(500, failed, "server_error")
    encoded_images = await asyncio.to_thread(
        lambda: [png_base64(image) for output in outputs for image in output.images[0]]
    )
    return {
        "created": int(time.time()),
        "data": [{"b64_json": data} for data in encoded_images],
    }


def build_items(
    body: Any,
    images: list[bytes],
    mask: bytes | None,
    height: int | None,
    width: int | None,
    state: ServingState,
) -> list[OmniDiffusionRequest]:
    """One request per input image (``n`` images each); off the event loop (masks are decoded)."""
    takes_mask = state.needs_mask()
    shared_mask = None
    if mask is not None:
        shared_mask = encoded(mask_from_alpha(mask) or mask)
    items = []
    for position, data in enumerate(images):
        item_mask = shared_mask
        if item_mask is None and takes_mask:
            try:
                own = mask_from_alpha(data)
            except Exception:  # noqa: BLE001 - not an image: the request's own check says so below
                own = None
            if own is None:
                raise ApiError(
                    400,
                    f"{state.pipeline_call()[0]} inpaints: send a mask (transparent or white "
                    "where to edit) or an image whose transparency marks it",
                    param="mask",
                )
            item_mask = encoded(own)
        try:
            items.append(
                OmniDiffusionRequest(
                    prompt=body.prompt,
                    image=encoded(data),
                    mask_image=item_mask,
                    height=height,
                    width=width,
                    num_images_per_prompt=body.n,
                    lora=state.lora_specs(body.lora),
                    **settings_of(body),
                )
            )
        except ValueError as exc:
            where = f"image[{position}]: " if len(images) > 1 else ""
            raise ApiError(400, f"{where}{exc}") from None
    return items
