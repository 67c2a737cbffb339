"""Background duties of an API process, off the request path:

* every second: report this process (pid, version) to Redis, flush request counts, replay the
  spool if it holds entries and Redis answers, refresh the per-process gauges;
* every ``reconcile_interval_s``: refresh the quarantine and repair gauges from Redis, and run
  the repair reconciliation (one process per interval, by a short Redis lock), so pending
  work is picked up even when no request arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import redis

from nnoculation.online.processes import forget_process, report_process
from nnoculation.online.reconcile import reconcile_once
from nnoculation.online.repairs import IN_FLIGHT, STATUSES
from service.runtime import Runtime

logger = logging.getLogger(__name__)

TICK_S = 1.0


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])  # noqa: SIM115
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def report_self(rt: Runtime) -> None:
    report_process(
        rt.redis,
        rt.keys,
        rt.member,
        {
            "pid": os.getpid(),
            "version": rt.slot.version or "",
            "started": rt.started,
            "device": str(rt.slot.current.device) if rt.slot.current else "",
            "swap_error": rt.swapper.last_error,
            "swapped_at": rt.swapper.swapped_at,
            "rss_bytes": resident_bytes(),
        },
        rt.settings.process_ttl_s,
    )


def refresh_gauges(rt: Runtime) -> None:
    """Quarantine and repair figures from Redis (every process sets the same values; the
    multiprocess gauges take the max)."""
    m = rt.metrics
    stats = rt.quarantine.stats()
    m.quarantine_stored.set(stats["size"])
    m.quarantine_overflow.set(stats["overflow"])
    sizes = {v: info["pending"] for v, info in stats["versions"].items()}
    labels = {
        (v, str(label)): count
        for v, info in stats["versions"].items()
        for label, count in info["badnet_labels"].items()
    }
    if rt.slot.version is not None:
        sizes.setdefault(rt.slot.version, 0)
    # Series that emptied (claimed, archived, purged) drop to 0 rather than keep their value.
    for version in rt.gauge_series["sizes"] - sizes.keys():
        sizes[version] = 0
    for key in rt.gauge_series["labels"] - labels.keys():
        labels[key] = 0
    for version, count in sizes.items():
        m.quarantine_size.labels(version=version).set(count)
    for (version, label), count in labels.items():
        m.quarantine_labels.labels(version=version, label=label).set(count)
    rt.gauge_series = {
        "sizes": {v for v, c in sizes.items() if c},
        "labels": {k for k, c in labels.items() if c},
    }
    records = rt.repairs.recent()
    for status in STATUSES:
        m.repairs.labels(status=status).set(sum(r["status"] == status for r in records))
    in_flight = [float(r["created"]) for r in records if r["status"] in IN_FLIGHT]
    m.repair_in_flight.set(int(bool(in_flight)))
    m.repair_started.set(min(in_flight, default=0.0))


def reconcile(rt: Runtime) -> list[str]:
    s = rt.settings
    return reconcile_once(
        rt.repairs, rt.quarantine, rt.store, s.quarantine_n, rt.member, s.reconcile_interval_s
    )


def every_tick(rt: Runtime) -> None:
    rt.metrics.queue_depth.set(rt.batcher.depth)
    rt.metrics.disagreement.set(rt.traffic.ratio())
    if rt.spool.files():
        rt.writer.replay()
        rt.metrics.spool_entries.set(rt.spool.count())
    else:
        rt.metrics.spool_entries.set(0)
    report_self(rt)
    rt.traffic.flush(rt.redis, rt.keys)


async def run(rt: Runtime) -> None:
    """The loop; Redis errors are counted and retried at the next tick."""
    last_slow = 0.0
    while True:
        try:
            await asyncio.to_thread(every_tick, rt)
            if time.monotonic() - last_slow >= rt.settings.reconcile_interval_s:
                last_slow = time.monotonic()
                await asyncio.to_thread(refresh_gauges, rt)
                for action in await asyncio.to_thread(reconcile, rt):
                    logger.info("reconcile: %s", action)
        except (redis.RedisError, OSError) as err:
            rt.metrics.redis_errors.labels(operation="housekeeping").inc()
            logger.debug("housekeeping: %s", err)
        except Exception:
            logger.exception("housekeeping failed")
        await asyncio.sleep(TICK_S)


async def stop(rt: Runtime, task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(redis.RedisError, OSError):
        await asyncio.to_thread(forget_process, rt.redis, rt.keys, rt.member)
