"""Route dependencies: the process's runtime and admin authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.runtime import Runtime

bearer = HTTPBearer(auto_error=False, description="NNOC_ADMIN_TOKEN")


async def runtime(request: Request) -> Runtime:
    # async (as every dependency here): FastAPI runs a plain def in its thread pool, a thread
    # hop per request that cost a third of the API's throughput in a profile.
    return request.app.state.runtime  # type: ignore[no-any-return]


def _token_ok(rt: Runtime, credentials: HTTPAuthorizationCredentials | None) -> bool:
    expected = rt.settings.admin_token
    if expected is None or credentials is None or credentials.scheme.lower() != "bearer":
        return False
    # Constant time: the comparison must not tell an attacker how much of a guess was right.
    return hmac.compare_digest(
        credentials.credentials.encode(), expected.get_secret_value().encode()
    )


RuntimeDep = Annotated[Runtime, Depends(runtime)]


async def require_admin(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    rt: RuntimeDep,
) -> None:
    """401 unless the request carries ``Authorization: Bearer <NNOC_ADMIN_TOKEN>``."""
    if not _token_ok(rt, credentials):
        raise HTTPException(
            401,
            "admin routes need 'Authorization: Bearer <token>' with the deployment's admin token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def caller_is_admin(rt: Runtime, authorization: str) -> bool:
    """Whether an ``Authorization`` header value carries the admin token (prediction routes
    show more to admins). Read from the header directly: those routes need no auth, so the
    schema declares none."""
    scheme, _, token = authorization.partition(" ")
    if not token:
        return False
    return _token_ok(rt, HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()))
