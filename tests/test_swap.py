"""The swap lets the old pair go: once no batch holds it, a swapped-out version is collected,
even one caught in a reference cycle after an earlier swap froze the collector's objects (the
memory check of twenty swaps under load in test_online_faults.py is too coarse for a tiny
model: a leaked pair is ~100 KB against hundreds of MB of torch per process)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

from models.store import ModelStore
from service.swap import ModelSlot, Swapper
from tests.online import DEPLOYMENT, publish


def test_a_swapped_out_version_is_collected(tmp_path: Path, tiny_deployment: Any) -> None:
    source, _, _ = tiny_deployment
    store_root = tmp_path / "store"
    publish(store_root, source)
    swaps: list[tuple[str | None, str]] = []

    slot = ModelSlot()  # both outlive the swap, as in a serving process

    async def main() -> tuple[Swapper, weakref.ref[Any], weakref.ref[Any]]:
        swapper = Swapper(
            ModelStore(store_root), DEPLOYMENT, slot, device="cpu", poll_interval_s=60,
            on_swap=lambda old, new, _s: swaps.append((old, new)),
            on_refuse=lambda version, err: None,
        )  # fmt: skip
        assert await swapper.sync()
        assert slot.current is not None
        old, old_net = weakref.ref(slot.current), weakref.ref(slot.current.goodnet.module)
        # A reference cycle (hooks, closures), so only the collector can free the pair, and
        # after the first swap's settle_garbage it sits among the frozen objects.
        slot.current.goodnet.module.cycle = slot.current  # type: ignore[assignment]
        publish(store_root, source)  # v0002, active
        assert await swapper.sync() and slot.version == "v0002"
        return swapper, old, old_net

    try:
        swapper, old, old_net = asyncio.run(main())
        assert swaps == [(None, "v0001"), ("v0001", "v0002")]
        assert old() is None and old_net() is None, "the swapped-out pair is still referenced"
        assert swapper.slot.version == "v0002"
    finally:
        gc.unfreeze()  # settle_garbage froze this test process's objects
