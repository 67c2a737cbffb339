"""``/admin/ui``: the quarantine dashboard, server-rendered HTML over the admin API's own
handlers (no route of its own logic), behind a signed session cookie.

A browser cannot send the bearer token on a navigation, so ``POST /admin/ui/login`` trades the
token for a session cookie (HttpOnly, SameSite=Strict, Path=/admin, an HMAC rather than the
token; ``service.ui.session``). Pages and pictures need the cookie; every state-changing form
also carries a CSRF token derived from the session. The API routes under ``/admin`` keep
accepting the bearer token only. Not in the OpenAPI schema: it is a page, not an API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from service.deps import RuntimeDep
from service.routes import admin
from service.runtime import Runtime
from service.ui import render, session

router = APIRouter(prefix=render.BASE, include_in_schema=False)

STYLESHEET = Path(__file__).resolve().parents[1] / "ui" / "dashboard.css"
SAMPLES_SHOWN = 60
REPAIRS_SHOWN = 10
# No script at all: only this origin's stylesheet and pictures, forms back to this origin.
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
NOTICES = {
    "repair": "Repair {} queued: a worker runs it and this page follows its progress.",
    "activate": "{} is now the active version; every API process swaps to it within seconds.",
    "rollback": "Rolled back: {} is now the active version.",
}
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
CsrfField = Annotated[str, Form(max_length=200)]


def _html(page: str, status_code: int = 200, **headers: str) -> HTMLResponse:
    return HTMLResponse(page, status_code, headers={**SECURITY_HEADERS, **headers})


def _login(error: str | None = None) -> HTMLResponse:
    """401 with the token form (and nothing else of the dashboard)."""
    return _html(render.login_page(error), 401, **{"WWW-Authenticate": "Bearer"})


def _admin_token(rt: Runtime) -> str | None:
    token = rt.settings.admin_token
    return token.get_secret_value() if token is not None else None


def _session(request: Request, rt: Runtime) -> tuple[str, str] | None:
    """The request's session cookie and the admin token it was issued under, when it is valid
    (a valid session implies a configured token)."""
    cookie, token = request.cookies.get(session.COOKIE), _admin_token(rt)
    if cookie is None or token is None or not session.session_valid(cookie, token):
        return None
    return cookie, token


def _require_session(request: Request, rt: Runtime) -> None:
    if _session(request, rt) is None:
        raise HTTPException(401, "sign in at /admin/ui first", {"WWW-Authenticate": "Bearer"})


def _refused(request: Request, rt: Runtime, csrf: str) -> HTMLResponse | None:
    """Why a state-changing form is refused (None when it carries a session and its CSRF
    token): 401 without a session, 403 with a missing or foreign CSRF token."""
    signed_in = _session(request, rt)
    if signed_in is None:
        return _login("Your session has ended; sign in again.")
    if not session.csrf_valid(csrf, *signed_in):
        page = render.message_page("Refused", "the form's CSRF token is missing or wrong")
        return _html(page, 403)
    return None


def _done(kind: str, ref: str) -> RedirectResponse:
    query = urlencode({"done": kind, "id": ref})
    return RedirectResponse(f"{render.BASE}?{query}", 303, headers=SECURITY_HEADERS)


def _failed(status_code: int, detail: Any) -> HTMLResponse:
    return _html(render.message_page("Not done", str(detail)), status_code)


# --- pages ---


@router.get("", response_class=HTMLResponse)
async def dashboard(
    request: Request,
    rt: RuntimeDep,
    done: Annotated[str | None, Query(max_length=20)] = None,
    ref: Annotated[str | None, Query(alias="id", max_length=80)] = None,
) -> HTMLResponse:
    """The dashboard, or 401 with the login form."""
    signed_in = _session(request, rt)
    if signed_in is None:
        return _login()
    status = await admin.status(rt)
    active = status.get("active_version")
    samples: dict[str, Any] = {"version": None, "items": []}
    if active:
        samples = await admin.quarantine_samples(rt, version=active, limit=SAMPLES_SHOWN)
    view = render.Dashboard(
        status=status,
        quarantine=await admin.quarantine_stats(rt),
        samples=samples,
        repairs=(await admin.list_repairs(rt, limit=REPAIRS_SHOWN))["repairs"],
        versions=await admin.list_versions(rt),
        notice=_notice(done, ref),
        csrf=session.csrf_token(*signed_in),
        sample_limit=SAMPLES_SHOWN,
    )
    return _html(render.dashboard_page(view))


def _notice(done: str | None, ref: str | None) -> str | None:
    if done not in NOTICES or ref is None or not _SAFE_ID.match(ref):
        return None
    return NOTICES[done].format(ref)


@router.get("/dashboard.css")
async def stylesheet() -> FileResponse:
    """The page's only asset (public: it holds no data)."""
    return FileResponse(STYLESHEET, media_type="text/css", headers={"Cache-Control": "no-cache"})


@router.post("/login", response_model=None)
async def login(
    request: Request,
    rt: RuntimeDep,
    token: Annotated[str, Form(max_length=1024)] = "",
) -> HTMLResponse | RedirectResponse:
    """Trade the admin token for a session cookie; a wrong token gets the form again."""
    admin_token = _admin_token(rt)
    if admin_token is None or not session.token_matches(token, admin_token):
        return _login("That is not the admin token.")
    response = RedirectResponse(render.BASE, 303, headers=SECURITY_HEADERS)
    response.set_cookie(
        session.COOKIE,
        session.new_session(admin_token),
        max_age=session.SESSION_TTL_S,
        path=session.COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout", response_model=None)
async def logout(
    request: Request, rt: RuntimeDep, csrf: CsrfField = ""
) -> HTMLResponse | RedirectResponse:
    """Clear the session cookie (a live session must send its CSRF token)."""
    signed_in = _session(request, rt)
    if signed_in is not None and not session.csrf_valid(csrf, *signed_in):
        return _html(render.message_page("Refused", "the form's CSRF token is wrong"), 403)
    response = RedirectResponse(render.BASE, 303, headers=SECURITY_HEADERS)
    response.delete_cookie(session.COOKIE, path=session.COOKIE_PATH, httponly=True,
                           samesite="strict")  # fmt: skip
    return response


# --- pictures (the admin API's, behind the session) ---


@router.get("/quarantine/{sha256}.png")
async def quarantine_image(
    request: Request,
    rt: RuntimeDep,
    sha256: Annotated[str, PathParam(pattern=admin.SHA_PATH)],
) -> Response:
    """A quarantined input as PNG."""
    _require_session(request, rt)
    response = await admin.quarantine_image(rt, sha256)
    response.headers.update(SECURITY_HEADERS)
    return response


@router.get("/versions/{version}/samples.png")
async def version_samples(request: Request, rt: RuntimeDep, version: admin.VersionPath) -> Response:
    """A repaired version's trigger pictures."""
    _require_session(request, rt)
    response = await admin.version_samples(rt, version)
    response.headers.update(SECURITY_HEADERS)
    return response


# --- actions (session + CSRF token) ---


async def _act(
    request: Request,
    rt: Runtime,
    csrf: str,
    kind: str,
    action: Callable[[], Awaitable[Any]],
    ref: Callable[[Any], object] = lambda result: result["active"],
) -> HTMLResponse | RedirectResponse:
    """Run an admin API handler for a form: refused without the session and its CSRF token,
    the API's error as a page, else back to the dashboard with a notice about ``ref(result)``."""
    if (refused := _refused(request, rt, csrf)) is not None:
        return refused
    try:
        result = await action()
    except HTTPException as err:
        return _failed(err.status_code, err.detail)
    if isinstance(result, JSONResponse):
        return _failed(result.status_code, json.loads(bytes(result.body))["detail"])
    return _done(kind, str(ref(result)))


@router.post("/repair", response_model=None)
async def repair(
    request: Request, rt: RuntimeDep, csrf: CsrfField = ""
) -> HTMLResponse | RedirectResponse:
    """``POST /admin/repair``."""
    return await _act(
        request, rt, csrf, "repair", lambda: admin.start_repair(rt), lambda r: r.repair_id
    )


@router.post("/versions/{version}/activate", response_model=None)
async def activate(
    request: Request, rt: RuntimeDep, version: admin.VersionPath, csrf: CsrfField = ""
) -> HTMLResponse | RedirectResponse:
    """``POST /admin/versions/{version}/activate``."""
    return await _act(request, rt, csrf, "activate", lambda: admin.activate(rt, version))


@router.post("/rollback", response_model=None)
async def rollback(
    request: Request, rt: RuntimeDep, csrf: CsrfField = ""
) -> HTMLResponse | RedirectResponse:
    """``POST /admin/rollback`` (to the active version's parent)."""
    return await _act(request, rt, csrf, "rollback", lambda: admin.rollback(rt, None))
