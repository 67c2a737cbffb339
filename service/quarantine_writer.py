"""The service's side of the quarantine: record a disagreement durably, fall back to the spool
when Redis is away, replay the spool when it is back, and start a repair at N.

A quarantined request is answered only after its entry is in Redis or fsynced in the spool,
so an acknowledged input is never lost by a crash of the API process or a Redis restart
(given Redis's AOF settings, see :mod:`nnoculation.online.quarantine`). Only disagreements pay
for this; agreeing inputs never touch Redis on the request path.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import redis

from nnoculation.online.quarantine import ADDED, DUPLICATE, FULL, Quarantine, QuarantineEntry
from nnoculation.online.repairs import Repairs
from service.metrics import ServiceMetrics
from service.spool import Spool

logger = logging.getLogger(__name__)

SPOOLED = "spooled"


class QuarantineWriter:
    """Writes entries (sync; the app calls it in a worker thread)."""

    def __init__(
        self,
        quarantine: Quarantine,
        repairs: Repairs,
        spool: Spool,
        metrics: ServiceMetrics,
        n: int,
        active_version: Callable[[], str | None],
    ) -> None:
        self.quarantine = quarantine
        self.repairs = repairs
        self.spool = spool
        self.metrics = metrics
        self.n = n
        self.active_version = active_version
        self._full_logged = False

    def write(self, entry: QuarantineEntry) -> str:
        """Store ``entry`` (Redis, else the spool); returns what happened to it.

        The write carries an event id, and so does its spool record: if Redis applied the write
        but died before answering, the replay is recognised and not counted again."""
        event_id = uuid.uuid4().hex[:16]
        try:
            result = self.quarantine.add(entry, event_id=event_id)
        except redis.RedisError as err:
            self.metrics.redis_errors.labels(operation="quarantine").inc()
            self.spool.append({**entry.to_record(), "event_id": event_id})
            self.metrics.quarantine_writes.labels(result=SPOOLED).inc()
            logger.warning(
                "Redis unreachable (%s); quarantine entry %s spooled",
                type(err).__name__,
                entry.sha256[:12],
            )
            return SPOOLED
        self._after(result.status, result.pending, entry.version)
        return result.status

    def _after(self, status: str, pending: int, version: str) -> None:
        self.metrics.quarantine_writes.labels(result=status).inc()
        if status == FULL:
            if not self._full_logged:
                logger.error(
                    "quarantine is at its cap of %d entries: new distinct inputs are counted "
                    "in nnoc_quarantine_overflow and not stored until a repair archives the "
                    "pending ones",
                    self.quarantine.cap,
                )
                self._full_logged = True
            return
        self._full_logged = False
        if status in (ADDED, DUPLICATE) and pending >= self.n:
            try:
                self.maybe_repair(version, pending)
            except redis.RedisError as err:  # the answer must not fail; reconciliation retries
                logger.warning("could not start a repair at N: %s", err)

    def maybe_repair(self, version: str, pending: int) -> None:
        """Start a repair of ``version`` if it is the active one and none is in flight."""
        if version != self.active_version() or self.repairs.in_backoff():
            return
        result = self.repairs.start(version, "auto", pending)
        if result.started:
            logger.info(
                "quarantine of %s reached N=%d: repair %s enqueued",
                version,
                self.n,
                result.repair_id,
            )

    def replay(self) -> int:
        """Replay every replayable spool file; returns the entries applied (0 while Redis is
        still away: the files stay)."""
        if not self.spool.files():
            return 0
        try:
            self.quarantine.client.ping()  # Redis still away: keep appending to the same file
        except redis.RedisError:
            return 0

        def apply(record: dict[str, Any]) -> None:
            entry = QuarantineEntry.from_record(record)
            result = self.quarantine.add(entry, event_id=str(record["event_id"]))
            self._after(result.status, result.pending, entry.version)

        try:
            return self.spool.replay(apply)
        except redis.RedisError:
            return 0
