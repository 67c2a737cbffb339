"""Which API processes are alive and which version each serves.

Every process refreshes ``proc:<host>:<pid>`` (a hash with a short TTL) every few seconds and
at once after a swap, so ``GET /admin/status`` can show every process's version and a test can
assert they agree."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from nnoculation.online.connection import text
from nnoculation.online.keys import Keys


def report_process(
    client: redis.Redis, keys: Keys, member: str, info: dict[str, Any], ttl_s: float
) -> None:
    """Record this process's ``info`` (pid, version, ...) for ``ttl_s`` seconds. Each value is
    kept as JSON, so :func:`live_processes` gives back the numbers and nulls it was given."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.process(member), mapping={k: json.dumps(v) for k, v in info.items()})
    pipe.pexpire(keys.process(member), int(ttl_s * 1000))
    pipe.zadd(keys.processes, {member: now})
    pipe.zremrangebyscore(keys.processes, "-inf", now - 10 * ttl_s)
    pipe.execute()


def forget_process(client: redis.Redis, keys: Keys, member: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.process(member))
    pipe.zrem(keys.processes, member)
    pipe.execute()


def _value(raw: bytes | str) -> Any:
    """A field as reported; a plain string (a process of an older release) as it is."""
    try:
        return json.loads(raw)
    except ValueError:
        return text(raw)


def live_processes(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The processes whose record has not expired, oldest registration first."""
    members = [text(m) for m in client.zrange(keys.processes, 0, -1)]
    pipe = client.pipeline(transaction=False)
    for member in members:
        pipe.hgetall(keys.process(member))
    out = []
    for member, raw in zip(members, pipe.execute(), strict=True):
        if raw:
            out.append({"member": member, **{text(k): _value(v) for k, v in raw.items()}})
    return out
