"""Request counts per version, kept in memory on the request path and flushed to Redis about
once a second (one pipeline, not one round trip per request), so ``/admin/status`` can show
the deployment's disagreement rate across every process; plus this process's disagreement
ratio over its last inputs, for the ``nnoc_disagreement_ratio`` gauge."""

from __future__ import annotations

import threading
from collections import Counter, deque

import redis

from nnoculation.online.keys import Keys

WINDOW = 1000


class Traffic:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._disagreements: Counter[str] = Counter()
        self._window: deque[bool] = deque(maxlen=WINDOW)
        self._window_hits = 0

    def record(self, version: str, disagree: bool) -> None:
        with self._lock:
            self._requests[version] += 1
            if disagree:
                self._disagreements[version] += 1
            if len(self._window) == WINDOW and self._window[0]:
                self._window_hits -= 1
            self._window.append(disagree)
            self._window_hits += disagree

    def ratio(self) -> float:
        with self._lock:
            return self._window_hits / len(self._window) if self._window else 0.0

    def flush(self, client: redis.Redis, keys: Keys) -> None:
        """Add the counts since the last flush to Redis; on failure they wait for the next."""
        with self._lock:
            requests, disagreements = self._requests, self._disagreements
            self._requests, self._disagreements = Counter(), Counter()
        if not requests:
            return
        try:
            pipe = client.pipeline(transaction=False)
            for version, count in requests.items():
                pipe.hincrby(keys.stats(version), "requests", count)
                pipe.hincrby(keys.stats(version), "disagreements", disagreements[version])
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._requests.update(requests)
                self._disagreements.update(disagreements)
            raise


def read_stats(client: redis.Redis, keys: Keys, version: str) -> dict[str, float]:
    """Requests and disagreements of ``version`` across every process, and their ratio."""
    raw = client.hgetall(keys.stats(version))
    requests = int(raw.get(b"requests", 0))
    disagreements = int(raw.get(b"disagreements", 0))
    return {
        "requests": requests,
        "disagreements": disagreements,
        "disagreement_rate": disagreements / requests if requests else 0.0,
    }
