"""Every Redis key, channel and queue name of one deployment, under one prefix.

All keys live under ``<prefix>:<deployment>:`` so several deployments (and several systems)
share a Redis without colliding. The Lua scripts build some keys from this base at run time, so
the deployment's keys must live on one Redis node (plain Redis or Sentinel, not Cluster).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# The RQ job that repairs a deployment: ``run_repair(deployment, repair_id, attempt)``. The
# service enqueues it by this name, so it never imports the worker package.
REPAIR_JOB = "worker.jobs.run_repair"


def check_name(kind: str, value: str) -> str:
    """A prefix or deployment name: letters, digits, '_', '.', '-' (no ':' or spaces)."""
    if not NAME_PATTERN.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Keys:
    """Names under ``<prefix>:<deployment>``."""

    prefix: str
    deployment: str

    def __post_init__(self) -> None:
        check_name("key prefix", self.prefix)
        check_name("deployment name", self.deployment)

    @property
    def base(self) -> str:
        return f"{self.prefix}:{self.deployment}"

    # --- quarantine ---
    def item(self, sha: str) -> str:
        return f"{self.base}:q:item:{sha}"

    def pending(self, version: str) -> str:
        return f"{self.base}:q:pending:{version}"

    def labels(self, version: str) -> str:
        return f"{self.base}:q:labels:{version}"

    @property
    def versions(self) -> str:
        return f"{self.base}:q:versions"

    @property
    def size(self) -> str:
        return f"{self.base}:q:size"

    @property
    def overflow(self) -> str:
        return f"{self.base}:q:overflow"

    @property
    def events(self) -> str:
        return f"{self.base}:q:events"

    def claimed(self, repair_id: str) -> str:
        return f"{self.base}:q:claimed:{repair_id}"

    def archive(self, repair_id: str) -> str:
        return f"{self.base}:q:archive:{repair_id}"

    @property
    def archives(self) -> str:
        return f"{self.base}:q:archives"

    # --- request statistics (flushed by each API process) ---
    def stats(self, version: str) -> str:
        return f"{self.base}:stats:{version}"

    # --- repairs ---
    @property
    def current_repair(self) -> str:
        return f"{self.base}:repair:current"

    def repair(self, repair_id: str) -> str:
        return f"{self.base}:repair:{repair_id}"

    def repair_heartbeat(self, repair_id: str) -> str:
        return f"{self.base}:repair:{repair_id}:heartbeat"

    @property
    def repairs(self) -> str:
        return f"{self.base}:repairs"

    @property
    def repair_backoff(self) -> str:
        return f"{self.base}:repair:backoff"

    @property
    def reconcile_lock(self) -> str:
        return f"{self.base}:reconcile:lock"

    # --- processes and announcements ---
    def process(self, member: str) -> str:
        return f"{self.base}:proc:{member}"

    @property
    def processes(self) -> str:
        return f"{self.base}:procs"

    @property
    def channel(self) -> str:
        return f"{self.base}:events"

    @property
    def queue(self) -> str:
        """The RQ queue of this deployment's repair jobs."""
        return f"{self.prefix}.{self.deployment}.repair"
