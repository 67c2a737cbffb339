"""Redis clients with short timeouts: a Redis outage must slow a request by a bounded amount,
not hang it (the service falls back to its spool)."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_TIMEOUT_S = 1.0


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = 1) -> redis.Redis:
    """A client for ``url`` (bytes replies: RQ stores binary payloads) that gives up after
    ``timeout_s`` per attempt and retries ``retries`` times without backoff."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries),
        health_check_interval=30,
    )


def text(value: Any) -> str:
    """A Redis reply (bytes, as these clients return them) as a string."""
    return value.decode() if isinstance(value, bytes) else str(value)
