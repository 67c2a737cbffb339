"""Prometheus metrics of the API (prometheus-client).

Names follow Prometheus conventions: base units, ``_total`` counters, histograms (they
aggregate across processes; summaries do not) with buckets from 100 us, because a forward pass
of a small net takes well under the client's default 5 ms first bucket. Under
``nnoculation serve`` every uvicorn worker writes to ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` merges them; gauges say how (``livesum``, ``livemax``, or ``liveall`` with a pid
label for per-process values such as the version served).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # the *_created series double the exposition for no use here
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Outcomes of a prediction (label "outcome" of nnoc_predictions_total).
AGREE = "agree"
QUARANTINED = "quarantined"
REJECTED = "rejected"  # bad input: 4xx
OVERLOADED = "overloaded"  # 503
TIMEOUT = "timeout"  # 504
EVALUATION = "evaluation"  # admin measurement traffic: answered, never quarantined


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class ServiceMetrics:
    """All metrics of one API process, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "nnoc_http_requests_total", "HTTP requests by route, method and status code",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "nnoc_http_request_duration_seconds", "HTTP request duration by route",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.predictions = Counter(
            "nnoc_predictions_total",
            "Inputs answered, by outcome (agree / quarantined / rejected / overloaded / timeout) "
            "and model version",
            ["outcome", "version"], registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "nnoc_queue_wait_seconds", "Time from a request's arrival at the batcher to the "
            "start of its batch", buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "nnoc_inference_duration_seconds", "Forward pass of one batch through both nets",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "nnoc_batch_size", "Inputs per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "nnoc_batch_queue_depth", "Requests waiting for the model", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.queue_capacity = Gauge(
            "nnoc_batch_queue_capacity", "Requests that may wait before 503", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.disagreement = Gauge(
            "nnoc_disagreement_ratio", "Share of the last 1,000 inputs of this process on "
            "which BadNet and GoodNet disagreed", registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.quarantine_writes = Counter(
            "nnoc_quarantine_writes_total", "Quarantine writes by result (added / duplicate / "
            "full / spooled / replayed)", ["result"], registry=r,
        )  # fmt: skip
        self.quarantine_size = Gauge(
            "nnoc_quarantine_pending", "Pending quarantined inputs by the version that caught "
            "them", ["version"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.quarantine_labels = Gauge(
            "nnoc_quarantine_pending_by_badnet_label", "Pending quarantined inputs by the "
            "BadNet's label (a backdoor piles up on its target)", ["version", "label"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.quarantine_stored = Gauge(
            "nnoc_quarantine_stored", "Quarantined inputs stored and not archived",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.quarantine_cap = Gauge(
            "nnoc_quarantine_cap", "Most quarantined inputs stored", registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.quarantine_overflow = Gauge(
            "nnoc_quarantine_overflow", "Distinct inputs refused because the quarantine was "
            "at its cap (since Redis was created)", registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.spool_entries = Gauge(
            "nnoc_spool_entries", "Quarantine entries in this process's spool, waiting for "
            "Redis", registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.repairs = Gauge(
            "nnoc_repairs", "Repair records by status (the last 50)", ["status"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.repair_in_flight = Gauge(
            "nnoc_repair_in_flight", "1 while a repair is queued or running", registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.repair_started = Gauge(
            "nnoc_repair_started_timestamp_seconds", "Unix time the repair in flight was "
            "started (queued); 0 while none is", registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.active_version = Gauge(
            "nnoc_active_version_info", "1 for the version this process serves",
            ["version"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.swaps = Counter(
            "nnoc_swaps_total", "Version swaps by result (swapped / refused)", ["result"],
            registry=r,
        )  # fmt: skip
        self.swap_duration = Histogram(
            "nnoc_swap_duration_seconds", "From noticing a new version to serving it (load, "
            "verify, warm up, swap)", buckets=SWAP_BUCKETS, registry=r,
        )  # fmt: skip
        self.redis_errors = Counter(
            "nnoc_redis_errors_total", "Redis calls that failed", ["operation"], registry=r
        )

    def set_version(self, old: str | None, new: str) -> None:
        # Set, not removed: in multiprocess mode a removed child would keep its last value.
        if old is not None and old != new:
            self.active_version.labels(version=old).set(0)
        self.active_version.labels(version=new).set(1)

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every process's metrics (merged in multiprocess mode)."""
        if multiprocess():
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
