"""Pre-deployment cells in worker processes: on a CPU, two one-thread processes training one
cell each finish a grid sooner than one process training cells one after the other on two
threads (1.31-1.48x per cell in ``docs/results/cell_cost.md``), because a small net's
per-batch work leaves most of a second thread idle.

:func:`cells_in_order` hands the search order to a pool of ``spawn``-ed workers and yields the
finished cells *in search order*, so the caller applies the paper's rule exactly as it does
one cell at a time: the first eligible cell is the whole grid's pick. Each worker trains a cell
exactly as the in-process search does (:func:`nnoculation.predeploy.train_group`, the same
seeds); only the thread count differs, so weights agree to float rounding, not bit for bit.
Cells still in flight when the caller stops (at most ``workers - 1``) are discarded.

Workers get the BadNet as the files :meth:`Net.save <models.nets.Net.save>` writes (read back
through the guarded loader every imported model takes) and send back the trained weights of
the cells the caller can use (eligible ones, or every one when asked), never a pickled module.
Closing the generator, an exception or Ctrl-C terminates the pool; nothing is written outside
a temporary folder that is removed.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from models.nets import Net
from nnoculation.data.imageset import ImageSet

if TYPE_CHECKING:
    from nnoculation.predeploy import Cell, PredeployConfig

BADNET_STEM = "badnet"


@dataclass(frozen=True)
class _Job:
    """What every worker needs, sent once when it starts."""

    badnet_dir: str
    badnet_entry: dict[str, Any]
    spec: Any
    num_classes: int
    retrain: ImageSet
    holdout: ImageSet
    cfg: PredeployConfig
    bar: float | None
    baseline_ca: float
    keep_all: bool
    threads: int


_WORKER: dict[str, Any] = {}  # per worker process: the job and its BadNet


def _start_worker(job: _Job) -> None:
    # tqdm's default lock is a multiprocessing semaphore made on first use; a worker that is
    # terminated mid-cell would leave it to the resource tracker's "leaked semaphore" warning.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(job.threads)
    _WORKER["job"] = job
    _WORKER["badnet"] = Net.load(Path(job.badnet_dir), job.badnet_entry, job.spec, job.num_classes)


def _train_one(cell: tuple[float, float]) -> tuple[Cell, dict[str, torch.Tensor] | None]:
    from nnoculation.predeploy import eligible, train_group  # predeploy imports this module

    job: _Job = _WORKER["job"]
    [(trained, net)] = train_group(
        _WORKER["badnet"], job.retrain, job.holdout, [cell], job.cfg, job.bar, batched=False,
        progress=False,
    )  # fmt: skip
    wanted = job.keep_all or eligible(trained, job.baseline_ca, job.cfg.theta)
    if net is None or not wanted:
        return trained, None
    return trained, {k: v.detach().cpu().clone() for k, v in net.module.state_dict().items()}


def worker_threads(workers: int, threads: int | None = None) -> int:
    """Intra-op threads per worker: the process's threads shared out, at least one."""
    total = torch.get_num_threads() if threads is None else threads
    return max(1, total // workers)


def cells_in_order(
    badnet: Net,
    retrain: ImageSet,
    holdout: ImageSet,
    order: list[tuple[float, float]],
    cfg: PredeployConfig,
    bar: float | None,
    baseline_ca: float,
    keep_all: bool = False,
) -> Generator[tuple[Cell, Net | None], None, None]:
    """Train the cells of ``order`` in ``cfg.workers`` processes; yield ``(cell, net)`` in that
    order. ``net`` is rebuilt from the worker's weights for eligible cells (every trained cell
    with ``keep_all``) and ``None`` otherwise. Close the generator to stop early."""
    if badnet.device.type != "cpu":
        raise ValueError("cells in worker processes are a CPU speed-up; on a GPU use workers=1")
    workers = min(cfg.workers, len(order))
    with tempfile.TemporaryDirectory(prefix="nnoc-cells-") as tmp:
        [path] = badnet.save(Path(tmp), BADNET_STEM)
        job = _Job(
            tmp, badnet.manifest_entry(path.name), badnet.spec, badnet.num_classes, retrain,
            holdout, cfg, bar, baseline_ca, keep_all, worker_threads(workers),
        )  # fmt: skip
        pool = mp.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(job,))
        try:
            for cell, state in pool.imap(_train_one, order, chunksize=1):
                yield cell, None if state is None else _with_weights(badnet, state)
        finally:
            stop_pool(pool)


def stop_pool(pool: Any) -> None:
    """Stop ``pool`` now, discarding the cells still in flight. ``Pool.terminate`` can raise
    ``AssertionError("Cannot have cache with result_hander not alive")`` when the consumer
    stops early: a CPython race in the pool's shutdown (python/cpython gh-78178, seen here in
    CI with a closed ``imap``), raised before it kills the workers; they are killed here then,
    so no training process outlives the search."""
    try:
        pool.terminate()
    except AssertionError:
        workers = list(pool._pool)  # the pool's own worker processes
        for process in workers:
            process.kill()  # SIGKILL: a worker may have inherited a mask that blocks SIGTERM
        for process in workers:
            process.join(timeout=30)
        return  # the pool's threads are daemons; its join() could wait on a stopped handler
    pool.join()


def _with_weights(badnet: Net, state: dict[str, torch.Tensor]) -> Net:
    net = badnet.clone()
    net.module.load_state_dict(state)
    return net.train_mode(False)
