"""``nnoculation worker``: an RQ worker on the deployment's repair queue, a reconciliation
thread, and a /metrics endpoint."""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from rq import Worker

from nnoculation.online.keys import Keys
from nnoculation.online.quarantine import Quarantine
from nnoculation.online.reconcile import reconcile_once
from nnoculation.online.repairs import Repairs
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


def reconcile_loop(settings: WorkerSettings, stop: threading.Event) -> None:
    """Every ``reconcile_interval_s``: re-enqueue lost repairs, start due ones."""
    from nnoculation.online.connection import connect

    client = connect(settings.redis_url, settings.redis_timeout_s)
    keys = Keys(settings.key_prefix, settings.deployment)
    repairs = Repairs(client, keys, settings.repair_timeout_s)
    quarantine = Quarantine(client, keys, settings.quarantine_cap)
    store = settings.open_store()
    holder = f"worker-{socket.gethostname()}-{os.getpid()}"
    while not stop.wait(settings.reconcile_interval_s):
        try:
            for action in reconcile_once(
                repairs, quarantine, store, settings.quarantine_n, holder,
                settings.reconcile_interval_s,
            ):  # fmt: skip
                logger.info("reconcile: %s", action)
        except (redis.RedisError, OSError) as err:
            logger.warning("reconcile: %s", err)
        except Exception:
            logger.exception("reconcile failed")


def run(settings: WorkerSettings, burst: bool = False) -> int:
    """Run the worker until it is stopped (or, with ``burst``, until the queue is empty).
    ``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus-client is first imported
    (``nnoculation worker`` does it), since the horse inherits the imported client."""
    if settings.metrics_port:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        start_http_server(settings.metrics_port, settings.metrics_host, registry=registry)
    keys = Keys(settings.key_prefix, settings.deployment)
    # No socket timeout: the worker blocks on the queue for longer than any request takes.
    connection = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=5, health_check_interval=30
    )
    stop = threading.Event()
    thread = threading.Thread(
        target=reconcile_loop, args=(settings, stop), daemon=True, name="reconcile"
    )
    thread.start()
    name = f"nnoc-{settings.deployment}-{socket.gethostname()}-{os.getpid()}"
    worker = Worker([keys.queue], connection=connection, name=name)
    logger.info("worker %s on queue %s (store %s)", name, keys.queue, settings.store_root)
    try:
        worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
    finally:
        stop.set()
    return 0
