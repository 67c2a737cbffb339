"""Liveness, readiness and metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import RuntimeDep
from service.schemas import HealthOut

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers")
async def healthz(rt: RuntimeDep) -> HealthOut:
    return HealthOut(status="ok", version=rt.slot.version, pid=os.getpid())


@router.get(
    "/readyz",
    response_model=HealthOut,
    responses={503: {"model": HealthOut, "description": "no version loaded yet"}},
    summary="Readiness: the active version is loaded and warmed up",
)
async def readyz(rt: RuntimeDep) -> HealthOut | JSONResponse:
    if rt.slot.current is None:
        body = HealthOut(status="not ready", version=None, pid=os.getpid())
        return JSONResponse(body.model_dump(), status_code=503)
    return HealthOut(status="ready", version=rt.slot.version, pid=os.getpid())


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics of every process of this server",
)
async def metrics(rt: RuntimeDep) -> Response:
    body, content_type = rt.metrics.exposition()
    return Response(body, media_type=content_type)
