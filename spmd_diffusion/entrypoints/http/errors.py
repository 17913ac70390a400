"""OpenAI's error shape, and the small parsers every route shares."""

from __future__ import annotations

import base64
from typing import Any

from spmd_diffusion.utils.images import image_png_bytes


class ApiError(Exception):
    """A failure with its HTTP status, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.code, self.param = (
            status,
            message,
            error_type,
            code,
            param,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(errors: list[dict[str, Any]]) -> ApiError:
    """A 400 naming the first field a validation refused (pydantic's or FastAPI's errors;
    FastAPI's "body" prefix left out)."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return ApiError(400, message, param=where or None)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's ``size`` ("WxH") as (height, width); None or "auto": the model's default."""
    if size is None or size == "auto":
        return None, None
    width, sep, height = size.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ApiError(
            400, f"size must look like 512x512 (width x height), got {size!r}", param="size"
        )
    return int(height), int(width)


def png_base64(image: Any) -> str:
    return base64.b64encode(image_png_bytes(image)).decode("ascii")
