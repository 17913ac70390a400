"""``GET /health``, ``GET /metrics`` and ``GET /v1/models``: what the server is and how it is
doing, answered from its state without waiting for the engine."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from spmd_diffusion.entrypoints.http.state import Serving, require_key, unable_to_serve

router = APIRouter()


@router.get("/health")
async def health(state: Serving) -> Response:
    """200 ok, or 503 with the reason (the engine failed, is closing or was shut down)."""
    problem = unable_to_serve(state.engine)
    if problem is not None:
        return Response(
            json.dumps({"status": "error", "error": problem}), 503, media_type="application/json"
        )
    return Response(json.dumps({"status": "ok"}), media_type="application/json")


@router.get("/metrics", dependencies=[Depends(require_key)])
async def prometheus_metrics(state: Serving) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(state: Serving) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": int(state.started),
                "owned_by": "spmd_diffusion",
            }
        ],
    }
