"""A lease lock in object storage: the repair lock of an ``s3://`` store.

The lock is one object, created with a conditional put (``If-None-Match: *``), so of two
processes that try at once exactly one gets it. Its body names the holder and the lease
(seconds). While the ``with`` block runs, a thread renews the lease every third of it by
rewriting the object with ``If-Match`` on the ETag it wrote last, and the block's end deletes
it (again only if it is still ours). A holder that dies (SIGKILL, a lost node) stops renewing:
once the object is older than its lease, the next process takes it over, again with
``If-Match``, so two takers cannot both win. Age is measured on the server's clock (the
object's Last-Modified against the Date of the answer), so the machines' clocks need not agree.

A holder whose renewals fail for a whole lease (the store unreachable) may lose the lock to
another process; it logs an error when it notices. Choose the lease longer than the longest
outage a repair should survive; a killed repair blocks the next one for at most that long.
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

from models.s3_objects import ConditionFailedError, Fetched, Objects
from models.store_names import RepairLockedError, StoreError

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
POLL_S = 1.0  # how often a blocking acquire looks again


def holder_id() -> str:
    """``host:pid:random``: who holds a lock, unique even across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _age_s(current: Fetched) -> float:
    now = current.server_time or datetime.now(UTC)
    return (now - current.last_modified).total_seconds()


class LeaseLock:
    """One lease lock object; see the module docstring."""

    def __init__(self, objects: Objects, key: str, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        if lease_s < 2:
            raise ValueError("a lease shorter than 2 s cannot outlast S3's 1 s timestamps")
        self.objects, self.key, self.lease_s = objects, key, lease_s
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
        try:
            info = json.loads(current.body)
            holder, lease_s = str(info["holder"]), float(info["lease_s"])
        except (ValueError, KeyError, TypeError):
            holder, lease_s = "unreadable lock object", self.lease_s
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

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            try:
                self._etag = self.objects.put(self.key, self._body(), if_match=self._etag)
            except ConditionFailedError:
                self.lost.set()
                logger.error("lost the lock %s: another process took it over", self.key)
                return
            except StoreError as err:  # keep trying: the lease may still be ours
                logger.warning("could not renew the lock %s: %s", self.key, err)

    @contextlib.contextmanager
    def held(self, what: str, *, blocking: bool = False) -> Iterator[str]:
        """Hold the lock for the ``with`` block (renewed meanwhile); yields the lock's key.
        ``RepairLockedError`` names ``what`` when another process holds it (unless
        ``blocking``)."""
        while (holder := self.try_acquire()) is not None:
            if not blocking:
                raise RepairLockedError(
                    f"{what} is already running ({holder} holds s3://{self.objects.bucket}/"
                    f"{self.key}, lease {self.lease_s:g} s)"
                )
            time.sleep(POLL_S)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(stop,), name="lease", daemon=True)
        renewer.start()
        try:
            yield self.key
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(ConditionFailedError, StoreError):
                self.objects.delete(self.key, if_match=self._etag)
