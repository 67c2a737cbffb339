"""Dashboard sessions and CSRF tokens, derived from the admin token (no server-side state, so
every API process and replica accepts a session another one issued).

A session cookie is ``<issued>.<nonce>.<mac>``: ``mac`` is an HMAC-SHA256 of the issue time
and a random nonce under a key derived from ``NNOC_ADMIN_TOKEN``, so the cookie never holds
the token, cannot be forged without it, expires after ``SESSION_TTL_S`` and dies with the
token (rotating the token ends every session). A form's CSRF token is an HMAC of the session
cookie: a page that knows neither the token nor the cookie cannot make one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

COOKIE = "nnoc_ui"
COOKIE_PATH = "/admin"
SESSION_TTL_S = 8 * 3600
# Clock skew tolerated between the processes that issue and check a session.
_SKEW_S = 60


def _key(admin_token: str) -> bytes:
    return hashlib.sha256(b"nnoc-ui-key\x00" + admin_token.encode()).digest()


def _mac(admin_token: str, message: str) -> str:
    return hmac.new(_key(admin_token), message.encode(), hashlib.sha256).hexdigest()


def token_matches(given: str, admin_token: str | None) -> bool:
    """Whether a login form's token is the admin token (constant time)."""
    if not admin_token or not given:
        return False
    return hmac.compare_digest(given.encode(), admin_token.encode())


def new_session(admin_token: str, now: float | None = None) -> str:
    """A fresh session cookie value."""
    issued = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    return f"{issued}.{nonce}.{_mac(admin_token, f'session|{issued}|{nonce}')}"


def session_valid(cookie: str | None, admin_token: str | None, now: float | None = None) -> bool:
    """Whether ``cookie`` is an unexpired session issued under ``admin_token``."""
    if not cookie or not admin_token or len(cookie) > 200:
        return False
    issued, _, rest = cookie.partition(".")
    nonce, _, mac = rest.partition(".")
    if not (issued.isdigit() and nonce and mac):
        return False
    expected = _mac(admin_token, f"session|{issued}|{nonce}")
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        return False
    age = (time.time() if now is None else now) - int(issued)
    return -_SKEW_S <= age <= SESSION_TTL_S


def csrf_token(cookie: str, admin_token: str) -> str:
    """The CSRF token the forms of the session ``cookie`` carry."""
    return _mac(admin_token, f"csrf|{cookie}")


def csrf_valid(given: str | None, cookie: str, admin_token: str) -> bool:
    """Whether a form's CSRF field belongs to the session (constant time)."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(), csrf_token(cookie, admin_token).encode())
