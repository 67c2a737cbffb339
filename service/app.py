"""The FastAPI app factory: ``uvicorn --factory service.app:create_app`` (what
``nnoculation serve`` runs in each worker process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match

import nnoculation
from models.store import StoreUnavailableError
from service import housekeeping
from service.metrics import ServiceMetrics
from service.middleware import RequestContext
from service.routes import admin, health, predict, ui
from service.runtime import Runtime
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Serves a possibly backdoored classifier (the *BadNet*) beside its retrained *GoodNet*
(NNoculation, Veldanda et al., AISec 2021, sec. 3.3). Every answer is the GoodNet's label;
inputs on which the two disagree are quarantined, and at N quarantined inputs a background
worker learns the trigger, repairs both nets and every API process swaps to the repaired
version. Admin routes need `Authorization: Bearer <NNOC_ADMIN_TOKEN>`.
"""


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the app; everything long-lived starts and stops in its lifespan."""
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await asyncio.to_thread(Runtime.build, settings, metrics)
        app.state.runtime = rt
        await rt.start()
        task = asyncio.get_running_loop().create_task(housekeeping.run(rt), name="housekeeping")
        try:
            yield
        finally:
            await housekeeping.stop(rt, task)
            await rt.stop()

    app = FastAPI(
        title="NNoculation",
        version=nnoculation.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.add_middleware(RequestContext, metrics=metrics)
    app.include_router(predict.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(ui.router)

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, err: Exception) -> JSONResponse:
        # Starlette's Allow header names the methods of the first route matching the path
        # only; GET and DELETE of one path are two routes here, so list them all.
        allowed = sorted(
            method
            for route in app.router.routes
            if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE
            for method in route.methods or ()
        )
        return JSONResponse(
            {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(allowed)}
        )

    @app.exception_handler(StoreUnavailableError)
    async def store_unavailable(request: Request, err: Exception) -> JSONResponse:
        # An s3:// store that does not answer (network, credentials, bucket): retry later; the
        # version already loaded keeps serving predictions meanwhile.
        logger.warning("store unavailable: %s %s: %s", request.method, request.url.path, err)
        return JSONResponse(
            {"detail": f"the model store is unavailable: {err}"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    return app
