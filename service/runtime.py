"""Everything long-lived in one API process, built from settings in the app's lifespan and
handed to routes through a dependency (no module globals)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import torch

from models.store_base import BundleStore
from nnoculation.deployment import Classified, LoadedDeployment
from nnoculation.inputs import DecodePolicy
from nnoculation.online.connection import connect
from nnoculation.online.keys import Keys
from nnoculation.online.quarantine import Quarantine
from nnoculation.online.repairs import Repairs
from service.batcher import MicroBatcher
from service.metrics import ServiceMetrics
from service.quarantine_writer import QuarantineWriter
from service.settings import ServiceSettings
from service.spool import Spool
from service.swap import ModelSlot, Swapper, settle_garbage
from service.traffic import Traffic

logger = logging.getLogger(__name__)


def infer_ensemble(model: LoadedDeployment, images: torch.Tensor) -> Classified:
    return model.classify(images)


def infer_badnet_alone(model: LoadedDeployment, images: torch.Tensor) -> Classified:
    """The BadNet alone, as a plain serving system would run it (benchmark baseline): its
    label is the answer and nothing is ever quarantined."""
    labels = model.predict_single("badnet", images)
    empty = torch.zeros((0,))
    return Classified(labels, labels, labels, empty, empty)


@dataclass
class Runtime:
    settings: ServiceSettings
    metrics: ServiceMetrics
    store: BundleStore
    keys: Keys
    redis: redis.Redis
    quarantine: Quarantine
    repairs: Repairs
    spool: Spool
    slot: ModelSlot
    swapper: Swapper
    batcher: MicroBatcher
    writer: QuarantineWriter
    traffic: Traffic
    member: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    started: float = field(default_factory=time.time)
    _policies: dict[str, DecodePolicy] = field(default_factory=dict)
    # Label sets of the quarantine gauges last set (housekeeping zeroes the ones that emptied).
    gauge_series: dict[str, set[Any]] = field(
        default_factory=lambda: {"sizes": set(), "labels": set()}
    )

    def decode_policy(self, model: LoadedDeployment) -> DecodePolicy:
        """The upload policy for ``model``'s input spec (cached per version)."""
        policy = self._policies.get(model.version)
        if policy is None:
            policy = DecodePolicy.for_spec(
                model.spec, self.settings.pixel_cap_factor, resize=self.settings.resize
            )
            self._policies = {model.version: policy}
        return policy

    @classmethod
    def build(cls, settings: ServiceSettings, metrics: ServiceMetrics) -> Runtime:
        torch.set_num_threads(settings.torch_threads())
        keys = Keys(settings.key_prefix, settings.deployment)
        client = connect(settings.redis_url, settings.redis_timeout_s)
        store = settings.open_store()
        slot = ModelSlot()
        quarantine = Quarantine(client, keys, settings.quarantine_cap)
        repairs = Repairs(client, keys, settings.repair_timeout_s)
        spool = Spool(settings.spool_dir)
        traffic = Traffic()

        def on_swap(old: str | None, new: str, seconds: float) -> None:
            metrics.swaps.labels(result="swapped").inc()
            metrics.swap_duration.observe(seconds)
            metrics.set_version(old, new)

        def on_refuse(version: str, reason: str) -> None:
            metrics.swaps.labels(result="refused").inc()

        swapper = Swapper(
            store,
            settings.deployment,
            slot,
            device=settings.device,
            poll_interval_s=settings.poll_interval_s,
            on_swap=on_swap,
            on_refuse=on_refuse,
        )

        def on_batch(size: int, seconds: float, waits: list[float]) -> None:
            metrics.batch_size.observe(size)
            metrics.inference.observe(seconds)
            for wait in waits:
                metrics.queue_wait.observe(wait)

        batcher = MicroBatcher(
            slot,
            infer_ensemble if settings.nets == "ensemble" else infer_badnet_alone,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            batching=settings.batching,
            on_batch=on_batch,
        )
        metrics.queue_capacity.set(settings.max_queue)
        metrics.quarantine_cap.set(settings.quarantine_cap)
        writer = QuarantineWriter(
            quarantine, repairs, spool, metrics, settings.quarantine_n, lambda: slot.version
        )
        return cls(
            settings=settings,
            metrics=metrics,
            store=store,
            keys=keys,
            redis=client,
            quarantine=quarantine,
            repairs=repairs,
            spool=spool,
            slot=slot,
            swapper=swapper,
            batcher=batcher,
            writer=writer,
            traffic=traffic,
        )

    async def start(self) -> None:
        if self.settings.admin_token is None:
            logger.warning("NNOC_ADMIN_TOKEN is not set: every /admin route answers 401")
        self.batcher.start()
        try:
            await self.swapper.sync()
        except Exception:
            logger.exception("could not load the active version at start")
        if self.slot.current is None:
            logger.warning(
                "deployment %r has no loadable active version in %s yet: /readyz answers 503 "
                "until one is activated",
                self.settings.deployment,
                self.settings.store_root,
            )
        self.swapper.start(self.redis, self.keys)
        settle_garbage()

    async def stop(self) -> None:
        await self.swapper.stop()
        await self.batcher.stop()
        self.spool.close()
        await asyncio.to_thread(self.redis.close)
