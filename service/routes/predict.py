"""``POST /predict`` and ``POST /predict/batch``: decode, batch, answer, quarantine."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from nnoculation.deployment import LoadedDeployment
from nnoculation.inputs import MIME_TYPES, ImageInputError, decode_image
from nnoculation.online.quarantine import QuarantineEntry
from service.batcher import DeadlineExceeded, NotReady, Overloaded, Prediction
from service.deps import caller_is_admin
from service.metrics import AGREE, EVALUATION, OVERLOADED, QUARANTINED, REJECTED, TIMEOUT
from service.middleware import request_id
from service.runtime import Runtime
from service.schemas import BatchItemOut, BatchOut, PredictionOut, error_responses
from service.uploads import MULTIPART, media_type, read_images

router = APIRouter(tags=["predict"])

RETRY_AFTER_S = "1"
EVALUATION_HEADER = "x-nnoc-evaluation"
# The prediction routes read their few inputs from the request themselves instead of through
# FastAPI dependencies (resolving them cost ~15 % of the API's CPU per request in a profile);
# the schema still documents the header.
_EVALUATION_PARAMETER = {
    "name": "X-NNOC-Evaluation",
    "in": "header",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "admin callers only: answer without quarantining or counting the input (for "
    "measuring a deployment on labelled data without feeding its quarantine)",
}


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ONE_FILE = {
    "schema": {
        "type": "object",
        "properties": {"file": {"type": "string", "format": "binary"}},
        "required": ["file"],
    }
}
_MANY_FILES = {
    "schema": {
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": 1,
            }
        },
        "required": ["files"],
    }
}
PREDICT_BODY = {
    "parameters": [_EVALUATION_PARAMETER],
    "requestBody": {
        "required": True,
        "description": "one image (PNG, JPEG, BMP, WebP or TIFF; 8-bit grayscale or RGB) as "
        "the raw body, or as the multipart field 'file'",
        "content": {
            **{mime: _BINARY for mime in MIME_TYPES.values()},
            "application/octet-stream": _BINARY,
            "multipart/form-data": _ONE_FILE,
        },
    },
}
BATCH_BODY = {
    "parameters": [_EVALUATION_PARAMETER],
    "requestBody": {
        "required": True,
        "description": "several images as multipart 'files' parts; each gets its own answer",
        "content": {"multipart/form-data": _MANY_FILES},
    },
}


def _current(rt: Runtime) -> LoadedDeployment:
    model = rt.slot.current
    if model is None:
        raise HTTPException(503, "no model version is loaded yet", headers={"Retry-After": "5"})
    return model


def _reject(rt: Runtime, model: LoadedDeployment, err: HTTPException) -> HTTPException:
    rt.metrics.predictions.labels(outcome=REJECTED, version=model.version).inc()
    return err


async def _answer(rt: Runtime, image: Any, deadline: float) -> Prediction:
    """Submit one decoded image; map the batcher's refusals to HTTP errors."""
    version = rt.slot.version or "none"
    try:
        return await rt.batcher.submit(image, max(deadline - time.perf_counter(), 0.001))
    except Overloaded as err:
        rt.metrics.predictions.labels(outcome=OVERLOADED, version=version).inc()
        raise HTTPException(
            503, f"the model is overloaded ({err}); retry shortly",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None  # fmt: skip
    except NotReady as err:
        raise HTTPException(503, str(err), headers={"Retry-After": "5"}) from None
    except DeadlineExceeded as err:
        rt.metrics.predictions.labels(outcome=TIMEOUT, version=version).inc()
        raise HTTPException(504, str(err)) from None
    except Exception:
        raise HTTPException(503, "inference failed; retry", headers={"Retry-After": "1"}) from None


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}  # fmt: skip


def _caller(request: Request) -> tuple[Runtime, bool, bool]:
    """The runtime, whether the caller is an admin, and whether it asked for evaluation."""
    rt: Runtime = request.app.state.runtime
    admin = caller_is_admin(rt, request.headers.get("authorization", ""))
    flag = request.headers.get(EVALUATION_HEADER, "false").strip().lower()
    if flag not in _BOOLEANS:
        raise HTTPException(422, "X-NNOC-Evaluation must be true or false")
    return rt, admin, admin and _BOOLEANS[flag]


async def _record(rt: Runtime, image: Any, pred: Prediction, evaluation: bool) -> bool:
    """Count the answer and quarantine a disagreement (durably, before answering)."""
    version = pred.model.version
    if evaluation:
        rt.metrics.predictions.labels(outcome=EVALUATION, version=version).inc()
        return pred.disagree
    rt.traffic.record(version, pred.disagree)
    if pred.disagree:
        entry = QuarantineEntry(image, pred.badnet_label, pred.goodnet_label, version, time.time())
        await asyncio.to_thread(rt.writer.write, entry)
    rt.metrics.predictions.labels(
        outcome=QUARANTINED if pred.disagree else AGREE, version=version
    ).inc()
    return pred.disagree


def _out(rt: Runtime, pred: Prediction, rid: str, show: bool) -> PredictionOut:
    return PredictionOut(
        label=pred.label,
        class_name=pred.model.class_names[pred.label],
        model_version=pred.model.version,
        request_id=rid,
        quarantined=pred.disagree if show else None,
    )


@router.post(
    "/predict",
    response_model=PredictionOut,
    response_model_exclude_none=True,
    responses=error_responses(400, 413, 415, 422, 503, 504),
    openapi_extra=PREDICT_BODY,
    summary="Classify one image with the BadNet + GoodNet ensemble",
)
async def predict(request: Request) -> Response:
    rt, admin, evaluation = _caller(request)
    deadline = time.perf_counter() + rt.settings.deadline_ms / 1000
    model = _current(rt)
    with rt.batcher.arrival():
        try:
            uploads = await read_images(request, rt.settings.max_body_bytes, max_files=1)
            image = decode_image(uploads[0].data, model.spec, rt.decode_policy(model))
        except ImageInputError as err:
            raise _reject(rt, model, HTTPException(err.status, str(err))) from None
        except HTTPException as err:
            raise _reject(rt, model, err) from None
    pred = await _answer(rt, image, deadline)
    await _record(rt, image, pred, evaluation and admin)
    out = _out(rt, pred, request_id(request.scope), admin or rt.settings.expose_quarantine)
    return Response(out.model_dump_json(exclude_none=True), media_type="application/json")


@router.post(
    "/predict/batch",
    response_model=BatchOut,
    response_model_exclude_none=True,
    responses=error_responses(400, 413, 415, 422, 503),
    openapi_extra=BATCH_BODY,
    summary="Classify several images; each is answered on its own",
)
async def predict_batch(request: Request) -> BatchOut:
    rt, admin, evaluation = _caller(request)
    deadline = time.perf_counter() + rt.settings.deadline_ms / 1000
    rid = request_id(request.scope)
    show = admin or rt.settings.expose_quarantine
    model = _current(rt)
    with rt.batcher.arrival():
        try:
            if media_type(request) != MULTIPART:
                raise HTTPException(415, "send the images as multipart 'files' parts")
            uploads = await read_images(
                request, rt.settings.max_body_bytes, max_files=rt.settings.max_batch_items
            )
        except HTTPException as err:
            raise _reject(rt, model, err) from None
        results: list[BatchItemOut | None] = [None] * len(uploads)
        images: dict[int, Any] = {}
        for i, upload in enumerate(uploads):
            try:
                images[i] = decode_image(upload.data, model.spec, rt.decode_policy(model))
            except ImageInputError as err:
                _reject(rt, model, HTTPException(err.status))
                results[i] = BatchItemOut(
                    index=i, filename=upload.filename, status=err.status, error=str(err)
                )

    async def one(i: int) -> BatchItemOut:
        try:
            pred = await _answer(rt, images[i], deadline)
        except HTTPException as err:
            return BatchItemOut(
                index=i, filename=uploads[i].filename, status=err.status_code, error=str(err.detail)
            )
        await _record(rt, images[i], pred, evaluation and admin)
        return BatchItemOut(
            index=i, filename=uploads[i].filename, status=200,
            prediction=_out(rt, pred, rid, show),
        )  # fmt: skip

    for item in await asyncio.gather(*(one(i) for i in images)):
        results[item.index] = item
    return BatchOut(request_id=rid, results=[r for r in results if r is not None])
