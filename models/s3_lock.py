"""A lease lock in object storage: the repair lock of an ``s3://`` store.

The lock is one object, created with a conditional put (``If-None-Match: *``), so of two
processes that try at once exactly one gets it. Its body names the holder and the lease
(seconds). While the ``with`` block runs, a thread renews the lease every third of it by
rewriting the object with ``If-Match`` on the ETag it wrote last, and the block's end deletes
it (again only if it is still ours). A holder that dies (SIGKILL, a lost node) stops renewing:
once the object is older than its lease, the next process takes it over, again with
``If-Match``, so two takers cannot both win. Age is measured on the server's clock (the
object's Last-Modified against the Date of the answer), so the machines' clocks need not agree.

A renewal whose condition fails is not taken for a loss at once: botocore may have retried a
PUT that had succeeded (its own write changed the ETag), so the renewer reads the object and,
if it still names this holder, adopts its ETag. A 409 (another conditional write in flight) or
any other error is logged and retried on the next round. The lock counts as lost (``lost`` is
set, an error is logged) when the object names another holder, or when no renewal succeeded
for a whole lease (the store unreachable: another process may take it over). The renewals use
their own client (:func:`lock_client`), so one renewal's worst case stays under a
third of the lease. :meth:`LeaseLock.check` raises :class:`LockLostError` once the lock is
lost; the store calls it before it publishes or moves the active pointer. Choose the lease
longer than the longest outage a repair should survive; a killed repair blocks the next one for
at most that long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from models.s3_objects import (
    ConditionConflictError,
    ConditionFailedError,
    Fetched,
    Objects,
    make_client,
)
from models.store_names import LockLostError, RepairLockedError, StoreError

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
POLL_S = 1.0  # how often a blocking acquire looks again


def holder_id() -> str:
    """``host:pid:random``: who holds a lock, unique even across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _age_s(current: Fetched) -> float:
    now = current.server_time or datetime.now(UTC)
    return (now - current.last_modified).total_seconds()


def _holder_and_lease(current: Fetched, default_lease_s: float) -> tuple[str, float]:
    """Who the lock object names, and its lease (an unreadable body names nobody)."""
    try:
        info = json.loads(current.body)
        return str(info["holder"]), float(info["lease_s"])
    except (ValueError, KeyError, TypeError):
        return "unreadable lock object", default_lease_s


def lock_client(lease_s: float) -> Any:
    """The S3 client of the renewals: one attempt (the renewer retries itself) and connect and
    read timeouts ``t`` such that a renewal's worst case, a PUT (``2t`` plus botocore's 1 s
    wait for "100 Continue") and the GET after a failed condition (``2t``), stays within the
    third of the lease between renewals: ``t = (lease/3 - 1) / 4``, at least 1 s (so for
    leases of 15 s and up; the default 30 s gives 2.25 s)."""
    timeout_s = max(1.0, (lease_s / 3 - 1) / 4)
    return make_client(connect_timeout_s=timeout_s, read_timeout_s=timeout_s, attempts=1)


class LeaseLock:
    """One lease lock object; see the module docstring."""

    def __init__(
        self,
        objects: Objects,
        key: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        renew_objects: Objects | None = None,
    ) -> None:
        """``renew_objects``: the client the renewal thread uses (default ``objects``)."""
        if lease_s < 2:
            raise ValueError("a lease shorter than 2 s cannot outlast S3's 1 s timestamps")
        self.objects, self.key, self.lease_s = objects, key, lease_s
        self.renew_objects = renew_objects if renew_objects is not None else objects
        self.holder = holder_id()
        self._etag: str | None = None
        self.lost = threading.Event()

    def _body(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "lease_s": self.lease_s, "renewed": time.time()}
        ).encode()

    def try_acquire(self) -> str | None:
        """Take the lock if it is free or its lease ran out; else the current holder's name."""
        try:
            self._etag = self.objects.put(self.key, self._body(), if_none_match=True)
            return None
        except ConditionFailedError:
            pass
        current = self.objects.get(self.key)
        if current is None:  # released meanwhile: try again at once
            return self.try_acquire()
        holder, lease_s = _holder_and_lease(current, self.lease_s)
        if holder == self.holder:  # a retried put that had succeeded: it is ours
            self._etag = current.etag
            return None
        if _age_s(current) <= lease_s:
            return holder
        try:
            self._etag = self.objects.put(self.key, self._body(), if_match=current.etag)
        except ConditionFailedError:  # another process took it over (or it was released) first
            return self.try_acquire()
        logger.warning("took over the expired lock %s of %s", self.key, holder)
        return None

    def _renew_once(self) -> bool:
        """Rewrite the lock object with ``If-Match``; False when it no longer names us."""
        objects = self.renew_objects
        try:
            self._etag = objects.put(self.key, self._body(), if_match=self._etag)
            return True
        except ConditionConflictError:
            raise  # 409: nothing decided; the caller retries
        except ConditionFailedError:
            pass
        current = objects.get(self.key)
        if current is not None and _holder_and_lease(current, 0)[0] == self.holder:
            self._etag = current.etag  # our own write, retried by botocore after it succeeded
            return True
        return False

    def _lose(self, why: str) -> None:
        self.lost.set()
        logger.error("lost the lock %s: %s", self.key, why)

    def _renew(self, stop: threading.Event, since: float) -> None:
        """Renew every third of the lease until ``stop``; ``since``: the monotonic time the
        lease last started (the acquiring request's start)."""
        renewed = since
        while not stop.wait(self.lease_s / 3):
            started = time.monotonic()
            try:
                if not self._renew_once():
                    self._lose("another process took it over")
                    return
                renewed = started
                continue
            except Exception as err:  # keep trying while the lease may still be ours
                logger.warning("could not renew the lock %s (retrying): %r", self.key, err)
            if time.monotonic() - renewed >= self.lease_s:
                self._lose(f"not renewed for its whole lease of {self.lease_s:g} s")
                return

    def check(self) -> None:
        """:class:`LockLostError` unless the lock is still ours: not lost by the renewer, and
        the object (read now) still names this holder."""
        if not self.lost.is_set():
            current = self.objects.get(self.key)
            if current is not None and _holder_and_lease(current, 0)[0] == self.holder:
                return
            self._lose("the lock object names another holder (or is gone)")
        raise LockLostError(
            f"this process lost the lock s3://{self.objects.bucket}/{self.key} (lease "
            f"{self.lease_s:g} s): another process may be doing the same work, so this is refused"
        )

    @contextlib.contextmanager
    def held(self, what: str, *, blocking: bool = False) -> Iterator[str]:
        """Hold the lock for the ``with`` block (renewed meanwhile); yields the lock's key.
        ``RepairLockedError`` names ``what`` when another process holds it (unless
        ``blocking``)."""
        while True:
            since = time.monotonic()
            holder = self.try_acquire()
            if holder is None:
                break
            if not blocking:
                raise RepairLockedError(
                    f"{what} is already running ({holder} holds s3://{self.objects.bucket}/"
                    f"{self.key}, lease {self.lease_s:g} s)"
                )
            time.sleep(POLL_S)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(stop, since), name="lease", daemon=True
        )
        renewer.start()
        try:
            yield self.key
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(ConditionFailedError, StoreError):
                self.objects.delete(self.key, if_match=self._etag)
