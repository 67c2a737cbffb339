"""``/admin``: status, quarantine, repairs and versions (bearer token on every route)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from models.bundle import BundleError, Manifest
from models.store import RejectedCandidateError, StoreError, StoreUnavailableError
from models.store_base import MAX_OVERRIDE_REASON, OVERRIDE_KEY, rejected_candidate
from nnoculation.inputs import encode_png
from nnoculation.online.announce import announce_activation
from nnoculation.online.processes import live_processes
from nnoculation.online.quarantine import StoredItem
from service.deps import RuntimeDep, require_admin
from service.runtime import Runtime
from service.schemas import Detail, RepairStarted, error_responses
from service.traffic import read_stats

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401),
)

PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
}
MAX_SAMPLES = 500
T = TypeVar("T")
VERSION_PATH = r"^v\d{4,}$"
SHA_PATH = r"^[0-9a-f]{64}$"
ARCHIVE_PATH = r"^[A-Za-z0-9_.-]{1,80}$"
VersionPath = Annotated[str, PathParam(pattern=VERSION_PATH, description="like v0001")]


def _class_name(rt: Runtime, label: int) -> str:
    model = rt.slot.current
    if model is not None and 0 <= label < len(model.class_names):
        return model.class_names[label]
    return str(label)


def _item_json(rt: Runtime, item: StoredItem) -> dict[str, Any]:
    return {
        "sha256": item.sha256,
        "badnet_label": item.badnet_label,
        "badnet_class": _class_name(rt, item.badnet_label),
        "goodnet_label": item.goodnet_label,
        "goodnet_class": _class_name(rt, item.goodnet_label),
        "version": item.version,
        "count": item.count,
        "first_seen": item.first_seen,
        "last_seen": item.last_seen,
        "image": f"/admin/quarantine/items/{item.sha256}.png",
    }


async def _read_or_404(rt: Runtime, read: Callable[..., T], *args: str) -> T:
    """``read(deployment, *args)`` off the event loop; 404 for a store error (an unknown
    version), except an unreachable store (503, service.app)."""
    try:
        return await asyncio.to_thread(read, rt.settings.deployment, *args)
    except StoreUnavailableError:
        raise  # 503 (service.app): the store is unreachable, not the version unknown
    except StoreError as err:
        raise HTTPException(404, str(err)) from None


async def _version_or_404(rt: Runtime, version: str) -> Manifest:
    """The version's manifest; 404 unless the version is published. Reads the manifest only
    (one GET on an s3:// store, not the whole bundle)."""
    return await _read_or_404(rt, rt.store.manifest, version)


async def _announce(rt: Runtime, version: str, source: str) -> None:
    await asyncio.to_thread(announce_activation, rt.redis, rt.keys, version, source)
    rt.swapper.kick()


# --- status ---


@router.get("/status", response_model=Detail, summary="Processes, versions, queue, quarantine")
async def status(
    rt: RuntimeDep,
) -> dict[str, Any]:
    def gather() -> dict[str, Any]:
        active = rt.swapper.active_version()
        return {
            "deployment": rt.settings.deployment,
            "active_version": active,
            "this_process": {
                "pid": os.getpid(),
                "member": rt.member,
                "version": rt.slot.version,
                "swap_error": rt.swapper.last_error,
            },
            "processes": live_processes(rt.redis, rt.keys),
            "batch_queue_depth": rt.batcher.depth,
            "repair_queue_depth": rt.repairs.queue_depth(),
            "current_repair": rt.repairs.current(),
            "quarantine": rt.quarantine.stats(),
            "traffic": read_stats(rt.redis, rt.keys, active) if active else None,
            "n": rt.settings.quarantine_n,
        }

    return await asyncio.to_thread(gather)


# --- quarantine ---


@router.get("/quarantine", response_model=Detail, summary="Quarantine sizes and histograms")
async def quarantine_stats(
    rt: RuntimeDep,
) -> dict[str, Any]:
    stats = await asyncio.to_thread(rt.quarantine.stats)
    for info in stats["versions"].values():
        info["badnet_classes"] = {
            _class_name(rt, label): count for label, count in info["badnet_labels"].items()
        }
    return stats


@router.get("/quarantine/samples", response_model=Detail, summary="Pending quarantined inputs")
async def quarantine_samples(
    rt: RuntimeDep,
    version: Annotated[
        str | None, Query(pattern=VERSION_PATH, description="default: served")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict[str, Any]:
    version = version or rt.slot.version
    if version is None:
        return {"version": None, "items": []}
    items = await asyncio.to_thread(rt.quarantine.samples, version, limit, offset)
    return {"version": version, "items": [_item_json(rt, i) for i in items]}


@router.get(
    "/quarantine/items/{sha256}.png",
    response_class=Response,
    responses={**PNG, **error_responses(404)},
    summary="A quarantined input as PNG (lossless)",
)
async def quarantine_image(
    rt: RuntimeDep,
    sha256: Annotated[str, PathParam(pattern=SHA_PATH)],
) -> Response:
    item = await asyncio.to_thread(rt.quarantine.item, sha256)
    if item is None:
        raise HTTPException(404, f"no pending or claimed quarantine entry {sha256}")
    return Response(encode_png(item.image), media_type="image/png")


@router.post(
    "/quarantine/purge",
    response_model=Detail,
    summary="Archive a version's pending inputs (kept under a purge id, never deleted)",
)
async def quarantine_purge(
    rt: RuntimeDep,
    version: Annotated[str, Query(pattern=VERSION_PATH)],
) -> dict[str, Any]:
    purge_id = time.strftime("purge-%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    archived = await asyncio.to_thread(rt.quarantine.purge, version, purge_id)
    return {"purge_id": purge_id, "version": version, "archived": archived}


@router.get(
    "/quarantine/archives",
    response_model=Detail,
    summary="Archives: entries consumed by repairs or purged",
)
async def quarantine_archives(rt: RuntimeDep) -> dict[str, Any]:
    return {"archives": await asyncio.to_thread(rt.quarantine.archives)}


@router.get(
    "/quarantine/archives/{archive_id}",
    response_model=Detail,
    responses=error_responses(404),
    summary="The entries archived under a repair's or a purge's id",
)
async def quarantine_archive(
    rt: RuntimeDep,
    archive_id: Annotated[str, PathParam(pattern=ARCHIVE_PATH)],
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    items = await asyncio.to_thread(rt.quarantine.archived, archive_id, limit)
    if not items:
        raise HTTPException(404, f"no archive {archive_id!r}")
    return {"id": archive_id, "items": [_item_json(rt, i) | {"image": None} for i in items]}


# --- repairs ---


@router.post(
    "/repair",
    response_model=RepairStarted,
    status_code=202,
    responses={
        409: {"model": RepairStarted, "description": "a repair is in flight or nothing is pending"},
        **error_responses(503),
    },
    summary="Repair the active version now, from its pending quarantine",
)
async def start_repair(
    rt: RuntimeDep,
) -> RepairStarted | JSONResponse:
    version = await asyncio.to_thread(rt.swapper.active_version)
    if version is None:
        raise HTTPException(503, "the deployment has no active version to repair")
    current = await asyncio.to_thread(rt.repairs.current)
    pending = await asyncio.to_thread(rt.quarantine.pending_count, version)
    if current is None and pending == 0:
        return _not_started(None, f"nothing to repair: no quarantined inputs of {version}")
    if current is None:
        result = await asyncio.to_thread(rt.repairs.start, version, "admin", pending)
        if result.started:
            return RepairStarted(repair_id=result.repair_id, started=True)
        current = result.repair_id
    return _not_started(current, f"repair {current} is in flight")


def _not_started(repair_id: str | None, detail: str) -> JSONResponse:
    body = RepairStarted(repair_id=repair_id, started=False, detail=detail)
    return JSONResponse(body.model_dump(), status_code=409)


@router.get("/repairs", response_model=Detail, summary="Recent repairs, newest first")
async def list_repairs(
    rt: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> dict[str, Any]:
    return {"repairs": await asyncio.to_thread(rt.repairs.recent, limit)}


async def _repair_or_404(rt: Runtime, repair_id: str) -> dict[str, Any]:
    record = await asyncio.to_thread(rt.repairs.get, repair_id)
    if record is None:
        raise HTTPException(404, f"no repair {repair_id!r}")
    return record


@router.get(
    "/repairs/{repair_id}", response_model=Detail, responses=error_responses(404),
    summary="One repair with its progress",
)  # fmt: skip
async def get_repair(
    rt: RuntimeDep,
    repair_id: str,
) -> dict[str, Any]:
    return await _repair_or_404(rt, repair_id)


@router.post(
    "/repairs/{repair_id}/cancel", response_model=Detail, responses=error_responses(404, 409),
    summary="Ask a repair in flight to stop",
)  # fmt: skip
async def cancel_repair(
    rt: RuntimeDep,
    repair_id: str,
) -> dict[str, Any]:
    record = await _repair_or_404(rt, repair_id)
    if not await asyncio.to_thread(rt.repairs.request_cancel, repair_id):
        raise HTTPException(409, f"repair {repair_id} is {record['status']}, not in flight")
    return {"repair_id": repair_id, "status": "cancel_requested"}


# --- versions ---


def _version_summary(rt: Runtime, version: str, active: str | None) -> dict[str, Any]:
    manifest = rt.store.manifest(rt.settings.deployment, version)
    repairs = manifest.provenance.get("repairs", [])
    last = repairs[-1] if repairs else None
    candidate = rejected_candidate(manifest)
    return {
        "version": version,
        "parent": manifest.parent,
        "created": manifest.created,
        "active": version == active,
        "rejected_candidate": candidate is not None,
        "candidate": candidate,
        "override": manifest.provenance.get(OVERRIDE_KEY),
        "metrics": manifest.metrics,
        "repair": None if last is None else {
            "passed_gate": last.get("passed_gate"),
            "holdout_ca": last.get("holdout_ca"),
            "seconds": last.get("seconds"),
            "trigger_effect": last.get("trigger_effect"),
            "relapse": last.get("relapse"),
            "relapse_basis": last.get("relapse_basis"),
        },
    }  # fmt: skip


@router.get("/versions", response_model=Detail, summary="Stored versions, newest first")
async def list_versions(
    rt: RuntimeDep,
) -> dict[str, Any]:
    def gather() -> dict[str, Any]:
        deployment = rt.settings.deployment
        try:
            versions = rt.store.versions(deployment)
        except StoreUnavailableError:
            raise
        except StoreError:  # nothing published yet
            versions = []
        active = rt.swapper.active_version()
        return {
            "deployment": deployment,
            "active": active,
            "versions": [_version_summary(rt, v, active) for v in reversed(versions)],
        }

    return await asyncio.to_thread(gather)


@router.get(
    "/versions/{version}", response_model=Detail, responses=error_responses(404),
    summary="A version's manifest and repair report",
)  # fmt: skip
async def get_version(
    rt: RuntimeDep,
    version: VersionPath,
) -> dict[str, Any]:
    return (await _version_or_404(rt, version)).to_dict()


@router.get(
    "/versions/{version}/samples.png", response_class=Response,
    responses={**PNG, **error_responses(404)},
    summary="A repaired version's trigger pictures: clean | G(clean) | quarantined",
)  # fmt: skip
async def version_samples(
    rt: RuntimeDep,
    version: VersionPath,
) -> Response:
    try:  # just this file (one GET on an s3:// store), checked against the manifest
        data = await _read_or_404(rt, rt.store.read_file, version, "repair_samples.png")
    except FileNotFoundError:
        raise HTTPException(404, f"version {version} was not made by a repair") from None
    return Response(data, media_type="image/png")


@router.post(
    "/versions/{version}/activate", response_model=Detail,
    responses=error_responses(404, 409, 422),
    summary="Make a stored version active in every process",
    description="A rejected candidate (a repair the validation gate refused) answers 409 unless "
    "`override=true` with a `reason` (422 without one): then a copy of it whose provenance "
    "records the override is published and activated (the candidate itself stays as it is). "
    "`override=true` on any other version answers 409; `reason` is read only with it.",
)  # fmt: skip
async def activate(
    rt: RuntimeDep,
    version: VersionPath,
    override: Annotated[
        bool, Query(description="activate a rejected candidate anyway (needs a reason)")
    ] = False,
    reason: Annotated[
        str | None, Query(max_length=MAX_OVERRIDE_REASON, description="why, with override")
    ] = None,
) -> dict[str, Any]:
    if not override:  # (an unknown version: 404 from _activate_with)
        return await _activate_with(rt, rt.store.activate, version, "admin")
    if rejected_candidate(await _version_or_404(rt, version)) is None:
        raise HTTPException(
            409, f"{version} is not a rejected candidate: activate it without override=true"
        )
    if not (reason or "").strip():
        raise HTTPException(422, "override=true needs a reason: say why the gate is overruled")

    def overrule(deployment: str, candidate: str) -> str:
        return rt.store.activate_override(deployment, candidate, reason=str(reason), by="admin")

    result = await _activate_with(rt, overrule, version, "admin override")
    return {**result, "override_of": version}


@router.post(
    "/rollback", response_model=Detail, responses=error_responses(404, 409, 422),
    summary="Activate the given version, or the active one's parent",
    description="Without a version the target skips rejected candidates; a rejected candidate "
    "named explicitly answers 409 (activate it with an override instead).",
)  # fmt: skip
async def rollback(
    rt: RuntimeDep,
    version: Annotated[str | None, Query(pattern=VERSION_PATH)] = None,
) -> dict[str, Any]:
    return await _activate_with(rt, rt.store.rollback, version, "admin rollback")


async def _activate_with(
    rt: Runtime, change: Callable[[str, Any], str | None], version: str | None, source: str
) -> dict[str, Any]:
    """Move the active pointer with ``change(deployment, version)`` (activate or rollback,
    which verify the bundle first), then announce the version now active to every process."""
    try:
        active = await asyncio.to_thread(change, rt.settings.deployment, version)
    except RejectedCandidateError as err:
        hint = f"POST /admin/versions/{version}/activate?override=true&reason=..."
        raise HTTPException(409, f"{err} ({hint})") from None
    except BundleError as err:
        refused = version or "to roll back to"
        raise HTTPException(422, f"version {refused} is refused: {err}") from None
    except StoreUnavailableError:
        raise  # 503 (service.app): the store is unreachable, not the version unknown
    except StoreError as err:
        raise HTTPException(404, str(err)) from None
    except ValueError as err:  # an override the store refuses (e.g. its reason)
        raise HTTPException(422, str(err)) from None
    active = active or str(version)
    await _announce(rt, active, source)
    return {"active": active}


@router.delete(
    "/versions/{version}", response_model=Detail, responses=error_responses(404, 409),
    summary="Delete a stored version (never the active one)",
)  # fmt: skip
async def delete_version(
    rt: RuntimeDep,
    version: VersionPath,
) -> dict[str, Any]:
    await _version_or_404(rt, version)
    if version == await asyncio.to_thread(rt.swapper.active_version):
        raise HTTPException(409, f"{version} is the active version; activate another first")
    try:
        await asyncio.to_thread(rt.store.delete, rt.settings.deployment, version)
    except StoreUnavailableError:
        raise  # 503 (service.app): the store is unreachable, not the version unknown
    except StoreError as err:
        raise HTTPException(409, str(err)) from None
    return {"deleted": version}
