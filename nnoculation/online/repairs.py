"""Repair records in Redis, the one-repair-at-a-time lock, RQ enqueueing and reconciliation.

A repair is a record ``repair:<id>`` (status, the version it repairs, progress, outcome) plus
the lock ``repair:current`` that names the one repair of the deployment in flight. A repair
the validation gate refused (status ``gated``) names in ``candidate_version`` the rejected
candidate store version that keeps its nets (never activated; ``candidate_error`` instead if
the store could not keep it); a published one names its version in ``result_version``. Starting a
repair is one Lua script (lock and record together), so API processes racing at N, an operator
and the reconciler can never start two. The RQ job ``worker.jobs.run_repair(deployment,
repair_id, attempt)`` carries ids only; ``attempt`` fences off a stale job: a job whose attempt
is no longer the record's does nothing.

Reconciliation closes the gaps a crash leaves (a worker killed with SIGKILL is noticed by RQ
itself only when its heartbeat expires and another worker's maintenance runs, minutes later):

* a record in flight whose job is neither queued nor running and whose repair heartbeat
  (refreshed every few seconds by the running job) has expired is re-enqueued with the next
  attempt; the job resumes its CycleGAN from the last epoch's checkpoint;
* pending inputs of the active version at or above N with no repair in flight (inputs
  replayed from a spool, say) start a repair.

So a killed repair runs again within ``heartbeat_ttl_s + reconcile_interval_s`` of its death,
once any worker (or API process) is alive to run the reconciler.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from nnoculation.online.connection import text
from nnoculation.online.keys import REPAIR_JOB, Keys

logger = logging.getLogger(__name__)

QUEUED = "queued"
RUNNING = "running"
CANCEL_REQUESTED = "cancel_requested"
PUBLISHED = "published"
GATED = "gated"
FAILED = "failed"
CANCELLED = "cancelled"
IN_FLIGHT = (QUEUED, RUNNING, CANCEL_REQUESTED)
TERMINAL = (PUBLISHED, GATED, FAILED, CANCELLED)
STATUSES = IN_FLIGHT + TERMINAL

# How long RQ keeps a finished job's result and a failed job (our record keeps the outcome).
JOB_RESULT_TTL_S = 24 * 3600
JOB_FAILURE_TTL_S = 7 * 24 * 3600
# A queued record gets this long to reach the RQ queue before the reconciler enqueues it.
ENQUEUE_GRACE_S = 10.0
_LIVE_JOB_STATES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}

_START = """
local base, rid, now = ARGV[1], ARGV[2], ARGV[3]
local version, trigger, pending = ARGV[4], ARGV[5], ARGV[6]
local current = redis.call('GET', base..':repair:current')
if current then return {0, current} end
redis.call('SET', base..':repair:current', rid)
redis.call('HSET', base..':repair:'..rid, 'id', rid, 'status', 'queued', 'version', version,
  'trigger', trigger, 'created', now, 'updated', now, 'attempt', '1', 'pending_at_start', pending)
redis.call('ZADD', base..':repairs', now, rid)
return {1, rid}
"""

# Release the lock only if it still names this repair.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Bump the attempt only if the record still has the attempt the caller saw.
_BUMP = """
local a = redis.call('HGET', KEYS[1], 'attempt')
if a ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'attempt', tostring(tonumber(a) + 1), 'updated', ARGV[2])
return tonumber(a) + 1
"""

JSON_FIELDS = ("losses", "holdout", "seconds", "purify")
# Read back as numbers (Redis keeps strings): timestamps, the repair's scalar measures and
# ``elapsed_s`` (seconds into the attempt at its last progress report).
FLOAT_FIELDS = (
    "created", "updated", "finished", "announced", "trigger_effect", "relapse", "elapsed_s",
)  # fmt: skip
INT_FIELDS = ("attempt", "epoch", "epochs", "entries", "pending_at_start")
BOOL_FIELDS = ("activated",)  # written as str(bool)


def new_repair_id() -> str:
    """Sortable and unique: UTC time to the second plus a random suffix."""
    return time.strftime("r%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def job_id(repair_id: str, attempt: int) -> str:
    return f"{repair_id}-a{attempt}"  # RQ ids: letters, digits, '_' and '-'


@dataclass(frozen=True)
class StartResult:
    started: bool
    repair_id: str


class Repairs:
    """Repair records, the lock and the queue of one deployment."""

    def __init__(self, client: redis.Redis, keys: Keys, job_timeout_s: int) -> None:
        self.client = client
        self.keys = keys
        self.job_timeout_s = job_timeout_s
        self.queue = Queue(keys.queue, connection=client)
        self._start = client.register_script(_START)
        self._unlock = client.register_script(_UNLOCK)
        self._bump = client.register_script(_BUMP)

    # --- starting ---

    def in_backoff(self) -> bool:
        return bool(self.client.exists(self.keys.repair_backoff))

    def start(self, version: str, trigger: str, pending: int) -> StartResult:
        """Start a repair of ``version`` unless one is in flight; enqueue its job."""
        rid = new_repair_id()
        started, current = self._start(
            args=[self.keys.base, rid, repr(time.time()), version, trigger, pending]
        )
        current = text(current)
        if not int(started):
            return StartResult(False, current)
        try:
            self.enqueue(rid, 1)
        except redis.RedisError as err:  # the record exists: reconciliation enqueues it
            logger.warning("repair %s recorded but not enqueued yet (%s)", rid, err)
        logger.info(
            "repair %s of version %s started (%s, %d pending)", rid, version, trigger, pending
        )
        return StartResult(True, rid)

    def enqueue(self, repair_id: str, attempt: int) -> Job:
        """Put ``run_repair(deployment, repair_id, attempt)`` on the deployment's queue."""
        jid = job_id(repair_id, attempt)
        job = self.queue.enqueue(
            REPAIR_JOB,
            self.keys.deployment,
            repair_id,
            attempt,
            job_id=jid,
            job_timeout=self.job_timeout_s,
            result_ttl=JOB_RESULT_TTL_S,
            failure_ttl=JOB_FAILURE_TTL_S,
            description=f"repair {repair_id} of {self.keys.deployment} (attempt {attempt})",
        )
        self.update(repair_id, job_id=jid)
        return job

    # --- records ---

    def get(self, repair_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self.keys.repair(repair_id))
        if not raw:
            return None
        record: dict[str, Any] = {text(k): text(v) for k, v in raw.items()}
        for key in FLOAT_FIELDS:
            if key in record:
                record[key] = float(record[key])
        for key in INT_FIELDS:  # "" blanks a stage's epoch when the next stage starts
            if key in record:
                record[key] = int(record[key]) if record[key] != "" else None
        for key in BOOL_FIELDS:
            if key in record:
                record[key] = record[key] == "True"
        for key in JSON_FIELDS:
            if key in record:
                record[key] = json.loads(record[key])
        return record

    def update(self, repair_id: str, **fields: Any) -> None:
        values: dict[Any, Any] = {"updated": repr(time.time())}
        for key, value in fields.items():
            if value is None:
                continue
            values[key] = json.dumps(value) if key in JSON_FIELDS else str(value)
        self.client.hset(self.keys.repair(repair_id), mapping=values)

    def current(self) -> str | None:
        value = self.client.get(self.keys.current_repair)
        return text(value) if value else None

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` repairs, newest first."""
        ids = [text(i) for i in self.client.zrevrange(self.keys.repairs, 0, limit - 1)]
        return [r for r in (self.get(i) for i in ids) if r is not None]

    def finish(self, repair_id: str, status: str, backoff_s: float = 0.0, **fields: Any) -> None:
        """Record a terminal status, release the lock, and optionally hold off new repairs."""
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not a terminal repair status")
        self.update(repair_id, status=status, finished=repr(time.time()), **fields)
        if backoff_s > 0:
            self.client.set(self.keys.repair_backoff, repair_id, px=int(backoff_s * 1000))
        self._unlock(keys=[self.keys.current_repair], args=[repair_id])
        logger.info("repair %s ended: %s", repair_id, status)

    def request_cancel(self, repair_id: str) -> bool:
        """Ask a repair in flight to stop at its next check; False if it is not in flight."""
        record = self.get(repair_id)
        if record is None or record["status"] not in IN_FLIGHT:
            return False
        self.update(repair_id, status=CANCEL_REQUESTED)
        return True

    # --- heartbeats of running jobs ---

    def beat(self, repair_id: str, ttl_s: float, holder: str) -> None:
        self.client.set(self.keys.repair_heartbeat(repair_id), holder, px=int(ttl_s * 1000))

    def alive(self, repair_id: str) -> bool:
        return bool(self.client.exists(self.keys.repair_heartbeat(repair_id)))

    # --- reconciliation ---

    def job_live(self, record: dict[str, Any]) -> bool:
        """Whether the record's current RQ job is queued or running."""
        jid = record.get("job_id")
        if not jid:
            return False
        try:
            status = Job.fetch(jid, connection=self.client).get_status(refresh=True)
        except NoSuchJobError:
            return False
        return status in _LIVE_JOB_STATES

    def reconcile(
        self,
        active_version: Callable[[], str | None],
        pending_count: Callable[[str], int],
        n: int,
    ) -> list[str]:
        """One pass of the rules in the module docstring; returns what it did (for logs)."""
        actions: list[str] = []
        current = self.current()
        record = self.get(current) if current else None
        if current and record is None:
            self._unlock(keys=[self.keys.current_repair], args=[current])
            actions.append(f"released the lock of unknown repair {current}")
            current = None
        if record is not None and current is not None:
            if record["status"] in TERMINAL:
                self._unlock(keys=[self.keys.current_repair], args=[current])
                actions.append(f"released the lock of ended repair {current}")
            elif self._stalled(current, record):
                bumped = int(
                    self._bump(
                        keys=[self.keys.repair(current)],
                        args=[str(record["attempt"]), repr(time.time())],
                    )
                )
                if bumped:
                    self.update(current, status=QUEUED)
                    self.enqueue(current, bumped)
                    actions.append(f"re-enqueued repair {current} as attempt {bumped}")
                    logger.warning(
                        "repair %s had no live job; re-enqueued (attempt %d)", current, bumped
                    )
            return actions
        version = active_version()
        if version is not None and not self.in_backoff():
            pending = pending_count(version)
            if pending >= n:
                result = self.start(version, "reconcile", pending)
                if result.started:
                    actions.append(f"started repair {result.repair_id}: {pending} pending")
        return actions

    def _stalled(self, repair_id: str, record: dict[str, Any]) -> bool:
        """In flight, but nothing is working on it: a queued record with no queued job, or a
        running one whose job stopped refreshing its heartbeat."""
        if time.time() - record["updated"] < ENQUEUE_GRACE_S:
            return False
        if record["status"] == QUEUED:
            return not self.job_live(record)
        return not self.alive(repair_id)

    def queue_depth(self) -> int:
        return int(self.queue.count)
