"""Prometheus metrics of repairs. The job runs in RQ's work horse, a child process, so the
worker always uses prometheus-client's multiprocess mode: the horse writes to
``PROMETHEUS_MULTIPROC_DIR`` and the worker's HTTP endpoint merges the files."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REPAIR_BUCKETS = (1, 5, 15, 30, 60, 120, 180, 300, 600, 1200, 3600, 7200)

repairs = Counter("nnoc_repairs_total", "Repairs that ended, by status", ["status"])
repair_duration = Histogram(
    "nnoc_repair_duration_seconds", "Wall time of a repair attempt, by status", ["status"],
    buckets=REPAIR_BUCKETS,
)  # fmt: skip


def finished(status: str, seconds: float) -> None:
    repairs.labels(status=status).inc()
    repair_duration.labels(status=status).observe(seconds)
