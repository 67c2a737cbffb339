"""Dynamic micro-batching in front of the model (what Triton, Ray Serve and TorchServe users
know, without the failure modes they report):

* a lone request on an idle model runs at once: the batcher waits for company only while other
  requests are already arriving (received but not yet decoded), and never longer than
  ``max_wait_s`` counted from the *oldest* waiting request's arrival;
* while a batch runs, new requests queue up and form the next batch, so batches grow with load
  by themselves;
* the queue is bounded (:class:`Overloaded` -> 503 + Retry-After) and every request has a
  deadline (:class:`DeadlineExceeded` -> 504);
* a request whose client went away or whose deadline passed is dropped from the queue (its
  future is cancelled) and never blocks the others; a batch that fails is re-run item by item
  so one bad item fails alone;
* the forward pass runs in one dedicated thread, off the event loop, on whatever model the
  slot holds when the batch starts: a swap never changes the model under a running batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from nnoculation.deployment import Classified, LoadedDeployment

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full (503)."""


class DeadlineExceeded(Exception):
    """The request was not answered within its deadline (504)."""


class NotReady(Exception):
    """No model is loaded yet (503)."""


class Slot(Protocol):
    """Where the batcher finds the model to run a batch on."""

    @property
    def current(self) -> LoadedDeployment | None: ...


Infer = Callable[[LoadedDeployment, torch.Tensor], Classified]


@dataclass(frozen=True)
class Prediction:
    """One input's answer and how it was served."""

    label: int
    badnet_label: int
    goodnet_label: int
    disagree: bool
    model: LoadedDeployment
    batch_size: int


@dataclass
class _Waiting:
    image: torch.Tensor
    arrival: float
    future: asyncio.Future[Prediction]


class MicroBatcher:
    """Collects single-image requests into batches; see the module docstring."""

    def __init__(
        self,
        slot: Slot,
        infer: Infer,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        batching: bool = True,
        on_batch: Callable[[int, float, list[float]], None] | None = None,
    ) -> None:
        self.slot = slot
        self.infer = infer
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait_s = max_wait_s if batching else 0.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.arriving = 0  # requests received whose image is not submitted yet
        self._queue: deque[_Waiting] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ---

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._queue:
            if not waiting.future.done():
                waiting.future.set_exception(NotReady("the service is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    # --- requests ---

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Wrap the reading and decoding of a request: while inside, the batcher knows another
        input is on its way and may hold a batch open for it (up to ``max_wait_s``)."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def submit(self, image: torch.Tensor, timeout_s: float) -> Prediction:
        """Queue one uint8 ``[C, H, W]`` image and wait for its answer."""
        if self.slot.current is None:
            raise NotReady("no model version is loaded yet")
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests are waiting")
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(image, time.perf_counter(), future))
        self._wakeup.set()
        try:
            # wait_for cancels the future on timeout and when this task is cancelled (the
            # client went away), so the batch loop skips it.
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {timeout_s * 1000:.0f} ms") from None

    # --- the loop ---

    def _drop_done(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _gather(self) -> None:
        """Hold the batch open while more requests are arriving, until it is full or the
        oldest request has waited ``max_wait_s``."""
        if self.max_wait_s <= 0:
            return
        deadline = self._queue[0].arrival + self.max_wait_s
        while len(self._queue) < self.max_batch_size and self.arriving > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        while self._queue and len(batch) < self.max_batch_size:
            waiting = self._queue.popleft()
            if not waiting.future.done():
                batch.append(waiting)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_done()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            model = self.slot.current
            if model is None:
                for waiting in batch:
                    waiting.future.set_exception(NotReady("no model version is loaded"))
                continue
            try:
                await self._run(loop, model, batch)
            except Exception:  # never let the loop die: later requests must still be served
                logger.exception("batch of %d failed", len(batch))
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(RuntimeError("inference failed"))

    async def _run(
        self, loop: asyncio.AbstractEventLoop, model: LoadedDeployment, batch: list[_Waiting]
    ) -> None:
        started = time.perf_counter()
        waits = [started - w.arrival for w in batch]
        try:
            images = torch.stack([w.image for w in batch])
            out = await loop.run_in_executor(self._executor, self.infer, model, images)
        except Exception:
            if len(batch) == 1:
                raise
            logger.warning("batch of %d failed; answering its items one by one", len(batch))
            for waiting in batch:
                try:
                    await self._run(loop, model, [waiting])
                except Exception as err:
                    if not waiting.future.done():
                        waiting.future.set_exception(err)
            return
        seconds = time.perf_counter() - started
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds, waits)
        disagree = out.disagree.tolist()
        labels, bad, good = (
            out.labels.tolist(),
            out.badnet_labels.tolist(),
            out.goodnet_labels.tolist(),
        )
        for i, waiting in enumerate(batch):
            if not waiting.future.done():
                waiting.future.set_result(
                    Prediction(
                        label=labels[i],
                        badnet_label=bad[i],
                        goodnet_label=good[i],
                        disagree=disagree[i],
                        model=model,
                        batch_size=len(batch),
                    )
                )
