"""Hot-swap: every API process converges on the store's active version without dropping a
request.

A process learns that the active version moved in two ways: an announcement on the
deployment's Redis channel (at once) and polling the store's active pointer every
``poll_interval_s`` (catches a missed announcement, or a Redis that is down). Either way it
then loads the store's *active* version in a background thread (checksums verified on the bytes
it deserialises), warms it up on known inputs, and swaps one reference. Batches already
running finish on the old pair, which is freed when the last of them ends. A version that fails
to load, verify or warm up is refused and the old one keeps serving; the same version is tried
again only after ``RETRY_REFUSED_S`` or when the pointer changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable

import redis

from models.store_base import BundleStore
from models.store_names import StoreError
from nnoculation.deployment import LoadedDeployment, load_deployment
from nnoculation.online.announce import Announcement
from nnoculation.online.keys import Keys

logger = logging.getLogger(__name__)

RETRY_REFUSED_S = 30.0
RESUBSCRIBE_DELAY_S = 1.0


def settle_garbage() -> None:
    """Collect now (the old pair, once no batch holds it) and freeze what survives: a process
    holding torch and a model has enough long-lived objects that the collector's full passes
    took tens to hundreds of milliseconds under load, showing up as p99 spikes. Frozen objects
    are skipped by those passes; unfreezing first lets a swapped-out model be collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelSlot:
    """The one reference the batcher reads at the start of every batch."""

    def __init__(self) -> None:
        self.current: LoadedDeployment | None = None

    @property
    def version(self) -> str | None:
        return self.current.version if self.current is not None else None


class Swapper:
    """Keeps ``slot`` on the store's active version; see the module docstring."""

    def __init__(
        self,
        store: BundleStore,
        deployment: str,
        slot: ModelSlot,
        *,
        device: str,
        poll_interval_s: float,
        on_swap: Callable[[str | None, str, float], None],
        on_refuse: Callable[[str, str], None],
    ) -> None:
        self.store = store
        self.deployment = deployment
        self.slot = slot
        self.device = device
        self.poll_interval_s = poll_interval_s
        self.on_swap = on_swap
        self.on_refuse = on_refuse
        self._lock = asyncio.Lock()
        self._refused: dict[str, float] = {}
        self._token: object = None  # the store's active token at the last sync
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self.last_error: str | None = None
        self.swapped_at: float | None = None  # wall time of the last swap

    def active_version(self) -> str | None:
        try:
            return self.store.active(self.deployment)
        except StoreError:
            return None

    async def sync(self) -> bool:
        """Load the active version if it is not the one served; True when a swap happened."""
        async with self._lock:
            version = await asyncio.to_thread(self.active_version)
            if version is None or version == self.slot.version:
                return False
            refused_at = self._refused.get(version)
            if refused_at is not None and time.monotonic() - refused_at < RETRY_REFUSED_S:
                return False
            started = time.perf_counter()
            try:
                loaded = await asyncio.to_thread(self._load, version)
            except Exception as err:  # any failure to load means: keep serving the old one
                self._refused[version] = time.monotonic()
                self.last_error = f"version {version} refused: {err}"
                logger.error(
                    "swap to %s refused, still serving %s: %s", version, self.slot.version, err
                )
                self.on_refuse(version, str(err))
                return False
            old = self.slot.version
            self.slot.current = loaded  # the swap: one reference assignment
            self.swapped_at = time.time()
            self._refused.pop(version, None)
            self.last_error = None
            del loaded
            settle_garbage()
            seconds = time.perf_counter() - started
            logger.info("swapped %s -> %s in %.2f s", old, version, seconds)
            self.on_swap(old, version, seconds)
            return True

    def _load(self, version: str) -> LoadedDeployment:
        loaded = load_deployment(self.store, self.deployment, version, self.device)
        loaded.warm_up()
        return loaded

    def kick(self) -> None:
        """Ask for a sync now (an announcement arrived)."""
        self._kick.set()

    # --- background tasks ---

    def start(self, client: redis.Redis, keys: Keys) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._poll(), name="swap-poll"))
        self._listener = threading.Thread(
            target=self._listen, args=(client, keys, loop), name="swap-listener", daemon=True
        )
        self._listener.start()

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _pointer_moved(self) -> bool:
        """One ``stat`` of the active pointer: did it change since the last look?"""
        try:
            token = self.store.active_token(self.deployment)
        except StoreError:
            token = None
        moved, self._token = token != self._token, token
        return moved

    async def _poll(self) -> None:
        while True:
            kicked = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.poll_interval_s)
                kicked = True
            self._kick.clear()
            moved = await asyncio.to_thread(self._pointer_moved)
            # A refused version is retried after RETRY_REFUSED_S even if nothing moved.
            if kicked or moved or self._refused:
                try:
                    await self.sync()
                except Exception:
                    logger.exception("model sync failed")

    def _listen(self, client: redis.Redis, keys: Keys, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking pub/sub loop in a thread; resubscribes after Redis errors."""
        while not self._stopping.is_set():
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    try:
                        event = Announcement.from_json(message["data"])
                    except (ValueError, KeyError, TypeError):
                        logger.warning("ignored a malformed announcement: %r", message["data"])
                        continue
                    logger.info(
                        "announcement: %s %s from %s", event.type, event.version, event.source
                    )
                    loop.call_soon_threadsafe(self.kick)
            except RuntimeError:  # the event loop closed: the process is stopping
                return
            except Exception as err:  # Redis away (or closing): subscribe again shortly
                if not self._stopping.is_set():
                    logger.debug("announcement listener: %s", err)
                    time.sleep(RESUBSCRIBE_DELAY_S)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()
