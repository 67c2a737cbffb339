"""The micro-batcher's promises: no added latency for a lone request, batches that grow under
load, a wait measured from the oldest request, a bounded queue, deadlines, and no batch that a
cancelled client or a bad item can stall or fail."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from nnoculation.deployment import Classified
from service.batcher import DeadlineExceeded, MicroBatcher, Overloaded


class FakeModel:
    version = "v0001"


class Slot:
    current: Any = FakeModel()


class Infer:
    """Labels each image by its first pixel; records batch sizes; can block or fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.sizes: list[int] = []
        self.seen: list[int] = []  # first pixel of every image that reached the model
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: int | None = None  # a pixel value that makes the whole batch raise

    def __call__(self, model: Any, images: torch.Tensor) -> Classified:
        self.gate.wait(10)
        self.sizes.append(int(images.shape[0]))
        self.seen.extend(int(v) for v in images[:, 0, 0, 0])
        if self.fail_on is not None and bool((images[:, 0, 0, 0] == self.fail_on).any()):
            raise RuntimeError("bad item in batch")
        time.sleep(self.delay_s)
        labels = images[:, 0, 0, 0].long()
        return Classified(labels, labels, labels, torch.zeros(0), torch.zeros(0))


def image(value: int) -> torch.Tensor:
    return torch.full((1, 2, 2), value, dtype=torch.uint8)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make(infer: Infer, **kwargs: Any) -> MicroBatcher:
    options = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue": 64}
    options.update(kwargs)
    return MicroBatcher(Slot(), infer, **options)


def test_a_lone_request_runs_at_once_even_with_a_long_window() -> None:
    async def main() -> float:
        batcher = make(Infer(), max_wait_s=1.0)
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit(image(3), timeout_s=5)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        assert result.label == 3 and result.batch_size == 1
        return elapsed

    assert run(main()) < 0.2  # far below the 1 s window: nobody else was arriving


def test_batches_form_while_the_model_is_busy() -> None:
    infer = Infer(delay_s=0.05)

    async def main() -> list[int]:
        batcher = make(infer, max_wait_s=0.0)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(image(i), 5) for i in range(20)))
        await batcher.stop()
        return [r.label for r in results]

    assert run(main()) == list(range(20))
    assert max(infer.sizes) > 1 and len(infer.sizes) < 20
    assert all(size <= 8 for size in infer.sizes)


def test_the_window_counts_from_the_oldest_arrival() -> None:
    """With requests still arriving, the batch waits, but the first request never waits
    longer than max_wait_s in all: time it spent queued behind a running batch counts."""

    async def main() -> float:
        infer = Infer()
        infer.gate.clear()  # the first batch runs until the gate opens
        batcher = make(infer, max_wait_s=0.5, max_batch_size=100)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit(image(0), 5))
        await asyncio.sleep(0.05)  # its batch is running, held at the gate
        with batcher.arrival():  # another request is on its way and never comes
            started = time.perf_counter()
            probe = asyncio.create_task(batcher.submit(image(1), 5))
            await asyncio.sleep(0.3)  # queued 0.3 s behind the running batch
            infer.gate.set()
            await probe
            waited = time.perf_counter() - started
        await blocker
        await batcher.stop()
        return waited

    # 0.5 s from its arrival; a window counted from when its batch began to form would end
    # 0.3 + 0.5 = 0.8 s after it.
    waited = run(main())
    assert 0.45 < waited < 0.7, waited


def test_a_full_queue_answers_overloaded() -> None:
    infer = Infer()
    infer.gate.clear()  # the model hangs: nothing leaves the queue

    async def main() -> None:
        batcher = make(infer, max_queue=3, max_batch_size=1)
        batcher.start()
        first = asyncio.create_task(batcher.submit(image(0), 5))  # taken into the running batch
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(batcher.submit(image(i), 5)) for i in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await batcher.submit(image(9), 5)
        infer.gate.set()
        await asyncio.gather(first, *waiting)
        await batcher.stop()

    run(main())


def test_deadline_gives_deadline_exceeded_and_later_requests_still_work() -> None:
    infer = Infer()
    infer.gate.clear()

    async def main() -> int:
        batcher = make(infer, max_batch_size=1)
        batcher.start()
        blocked = asyncio.create_task(batcher.submit(image(0), 5))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(image(1), timeout_s=0.1)
        infer.gate.set()
        await blocked
        result = await batcher.submit(image(2), 5)
        await batcher.stop()
        return result.label

    assert run(main()) == 2
    assert 1 not in infer.seen  # the expired request was dropped, never computed


def test_a_cancelled_client_neither_stalls_nor_fails_its_batch() -> None:
    infer = Infer(delay_s=0.02)
    infer.gate.clear()

    async def main() -> list[int]:
        batcher = make(infer, max_wait_s=0.0)
        batcher.start()
        first = asyncio.create_task(batcher.submit(image(0), 5))
        await asyncio.sleep(0.05)  # the model is busy with the first; the rest queue up
        tasks = [asyncio.create_task(batcher.submit(image(i), 5)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()  # a client goes away while queued
        infer.gate.set()
        done = await asyncio.gather(first, *tasks, return_exceptions=True)
        after = await batcher.submit(image(7), 5)  # and the batcher goes on
        await batcher.stop()
        assert isinstance(done[2], asyncio.CancelledError)
        assert 2 not in infer.seen  # the cancelled request was never computed
        return [d.label for d in done if not isinstance(d, BaseException)] + [after.label]

    assert run(main()) == [0, 1, 3, 4, 5, 7]


def test_one_bad_item_fails_alone() -> None:
    infer = Infer(delay_s=0.02)
    infer.fail_on = 13

    async def main() -> list[Any]:
        batcher = make(infer, max_wait_s=0.0)
        batcher.start()
        infer.gate.clear()
        first = asyncio.create_task(batcher.submit(image(0), 5))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit(image(v), 5)) for v in (1, 13, 2)]
        await asyncio.sleep(0.01)
        infer.gate.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        await batcher.stop()
        return out

    out = run(main())
    assert [o.label for o in (out[0], out[1], out[3])] == [0, 1, 2]
    assert isinstance(out[2], RuntimeError)
    assert 3 in infer.sizes  # the three queued items did go as one batch first


def test_unbatched_mode_runs_one_at_a_time() -> None:
    infer = Infer(delay_s=0.01)

    async def main() -> None:
        batcher = make(infer, batching=False)
        batcher.start()
        await asyncio.gather(*(batcher.submit(image(i), 5) for i in range(6)))
        await batcher.stop()

    run(main())
    assert infer.sizes == [1] * 6
