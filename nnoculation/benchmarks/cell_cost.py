"""What one pre-deployment cell costs on this machine, and what each speed idea would buy.

Issue 12 asks for a search about 3x faster with the same pick, and to "measure each idea; keep
what pays". A cell retrains the BadNet for 4 epochs on 4,000 validation images plus their noisy
copy (500 steps of batch 64 on Fashion-MNIST). This script times one such cell of the
pre-deployment benchmark's BadNets (``predeploy_speed``'s LeNet as TorchScript and as ``.pt2``,
and the zoo's small CNN) under each idea, in one process, one after the other:

* ``baseline``: :func:`nnoculation.predeploy.train_cell` as the search runs it;
* ``fused_adam``: the same with torch's fused CPU Adam (``fused=True``; not bit-identical to the
  default implementation, so a different pick is possible: measured here, not shipped);
* ``one_thread``: one intra-op thread instead of two;
* ``channels_last``: the retrained copy's weights in channels-last memory format (so its
  convolutions run channels-last);
* ``compiled``: the retrained copy wrapped in ``torch.compile`` (inductor, the default mode);
  the first cell pays the compilation (``compile_s``), the median is of the cells after it,
  which reuse the compiled graph;
* ``two_processes``: two cells at once in two processes of one thread each (seconds per cell
  = wall seconds / 2): what a process pool over cells would give on 2 cores;
* ``batched_k``: ``k`` cells as one ``torch.func`` batched model (seconds per cell = wall / k;
  TorchScript cannot be batched);
* ``evaluate``: the hold-out CA that follows every cell (1,000 images).

Writes ``docs/results/cell_cost.{json,md}`` (one entry per BadNet, the commit, torch, device).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from models.nets import Net
from nnoculation import training
from nnoculation.badnets import load_splits
from nnoculation.batched import CellJob, batch_refusal, train_batched
from nnoculation.benchmarks.common import RUNS_DIR, commit, provenance, write_results
from nnoculation.benchmarks.predeploy_speed import STEM as SPEED_STEM
from nnoculation.benchmarks.predeploy_speed import Subject, subjects
from nnoculation.data.splits import Splits
from nnoculation.metrics import clean_accuracy
from nnoculation.predeploy import PredeployConfig, cell_recipe, retraining_data, train_cell
from nnoculation.recipes import default_recipe
from nnoculation.reports import markdown_table
from nnoculation.runtime import configure_threads

COMMAND = "python -m nnoculation.benchmarks.cell_cost"
STEM = "cell_cost"
NETS = ("lenet_bn_torchscript", "lenet_bn_pt2", "small_cnn")
ALPHA_MULTIPLE, GAMMA = 3.0, 0.3  # a mid-grid cell
BATCH_SIZES = (2, 3, 6)
REPEATS = 3


@contextmanager
def fused_adam() -> Iterator[None]:
    """Within the block, :func:`nnoculation.training.make_optimizer` gives fused Adam."""
    plain = training.make_optimizer

    def fused(params: Any, cfg: training.TrainConfig) -> torch.optim.Optimizer:
        if cfg.optimizer != "adam":
            return plain(params, cfg)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    with patch.object(training, "make_optimizer", fused):
        yield


Transform = Callable[[torch.nn.Module], torch.nn.Module]


@contextmanager
def cloned_as(transform: Transform) -> Iterator[None]:
    """Within the block, :meth:`models.nets.Net.clone` (the copy every cell retrains) gives a
    net whose module is ``transform(module)``."""
    plain = Net.clone

    def clone(self: Net) -> Net:
        copy = plain(self)
        copy.module = transform(copy.module)
        return copy

    with patch.object(Net, "clone", clone):
        yield


def _channels_last(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(memory_format=torch.channels_last)


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(module)  # type: ignore[return-value]


def _with(transform: Transform, cell: Callable[[], object], repeats: int) -> dict[str, float]:
    with cloned_as(transform):
        return _median(cell, repeats)


def _compiled_cells(cell: Callable[[], object], repeats: int) -> dict[str, Any]:
    with cloned_as(_compiled):
        compile_s = _timed(cell)  # the first cell compiles; later ones reuse the graph
        return {**_median(cell, repeats), "compile_s": round(compile_s, 1)}


def _guarded(measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A variant a net cannot take (torch.compile of TorchScript, say) is a result, not a crash."""
    try:
        return measure()
    except Exception as err:
        return {"refused": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _median(run: Callable[[], object], repeats: int) -> dict[str, float]:
    times = [_timed(run) for _ in range(repeats)]
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}  # fmt: skip


def _child(name: str, queue: Any, start: Any) -> None:
    """One cell in a process of its own with one thread (for ``two_processes``); both
    children load their data first and start training together at ``start`` (a barrier)."""
    torch.set_num_threads(1)
    subject, splits, cfg = _setup(name)
    alpha = cfg.alpha0 * ALPHA_MULTIPLE
    start.wait()
    queue.put(_timed(lambda: train_cell(subject.badnet, splits.retrain, alpha, GAMMA, cfg)))


def _setup(name: str) -> tuple[Subject, Splits, PredeployConfig]:
    recipe = default_recipe("fashion-mnist")
    splits = load_splits(recipe)
    subject = subjects(recipe)[name](splits, RUNS_DIR / SPEED_STEM)
    cfg = PredeployConfig(alpha0=subject.alpha0, optimizer=subject.optimizer)  # type: ignore[arg-type]
    return subject, splits, cfg


def _two_processes(name: str) -> float:
    """Wall seconds of two one-thread cells run at once, per cell (setup not counted)."""
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_child, args=(name, queue, start)) for _ in range(2)]
    for p in procs:
        p.start()
    cells = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    # Each child times its own cell; they overlap, so the pair's wall time is about the longer.
    return round(max(cells) / 2, 3)


def measure(name: str, repeats: int) -> dict[str, Any]:
    """Every variant for one BadNet; seconds per cell."""
    subject, splits, cfg = _setup(name)
    net, alpha = subject.badnet, cfg.alpha0 * ALPHA_MULTIPLE

    def cell() -> object:
        return train_cell(net, splits.retrain, alpha, GAMMA, cfg)

    cell()  # warm-up (first-call costs: TorchScript profiling, allocator)
    out: dict[str, Any] = {"baseline": _median(cell, repeats)}
    with fused_adam():
        out["fused_adam"] = _median(cell, repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["one_thread"] = _median(cell, repeats)
    finally:
        torch.set_num_threads(threads)
    out["two_processes"] = {"per_cell_s": _two_processes(name)}
    out["channels_last"] = _guarded(lambda: _with(_channels_last, cell, repeats))
    out["compiled"] = _guarded(lambda: _compiled_cells(cell, repeats))
    trained = cell()
    out["evaluate"] = _median(lambda: clean_accuracy(trained, splits.holdout), repeats)  # type: ignore[arg-type]
    refusal = batch_refusal(net)
    if refusal is None:
        data = retraining_data(splits.retrain, GAMMA, cfg.seed, cfg.fresh_noise)
        for k in BATCH_SIZES:
            jobs = [CellJob(alpha * (1 + i / 10), data) for i in range(k)]
            wall = _timed(partial(train_batched, net, jobs, cell_recipe(alpha, cfg)))
            out[f"batched_{k}"] = {"per_cell_s": round(wall / k, 3)}
    else:
        out["batched"] = {"refused": refusal}
    base = out["baseline"]["median_s"]
    out["speedup_vs_baseline"] = {
        key: round(base / (v.get("median_s") or v["per_cell_s"]), 2)
        for key, v in out.items()
        if isinstance(v, dict) and ("median_s" in v or "per_cell_s" in v) and key != "evaluate"
    }
    return out


def compile_note(entries: list[dict[str, Any]]) -> str:
    """The compilation seconds of each net, or why torch.compile refused it."""
    parts = []
    for e in entries:
        got = e["cost"].get("compiled", {})
        what = f"{got['compile_s']:g} s" if "compile_s" in got else got.get("refused", "-")
        parts.append(f"{e['name']} {what}")
    return "; ".join(parts)


def markdown(entries: list[dict[str, Any]]) -> str:
    variants = ["baseline", "fused_adam", "one_thread", "two_processes", "channels_last",
                "compiled", *(f"batched_{k}" for k in BATCH_SIZES)]  # fmt: skip
    rows = []
    for e in entries:
        cells = [e["name"]]
        for v in variants:
            got = e["cost"].get(v)
            if got is None or "refused" in got:
                cells.append("refused" if got else "-")
                continue
            s = got.get("median_s", got.get("per_cell_s"))
            cells.append(f"{s:.2f} s ({e['cost']['speedup_vs_baseline'][v]:.2f}x)")
        cells.append(f"{e['cost']['evaluate']['median_s']:.3f} s")
        rows.append(cells)
    return "\n".join(
        [
            "# One pre-deployment cell: what it costs and what each speed idea buys",
            "",
            f"Seconds per cell (alpha = {ALPHA_MULTIPLE:g} x alpha0, gamma = {GAMMA:.0%}: 4 "
            "epochs, 500 steps of batch 64), the median of "
            f"{REPEATS} runs where a median is given, and the speed-up over the baseline. "
            "`two_processes`: two one-thread cells at once, wall / 2. `batched_k`: k cells as "
            "one `torch.func` model, wall / k (TorchScript is refused). `compiled`: "
            "`torch.compile`, cells after the first (the first pays the compilation: "
            f"{compile_note(entries)}). `evaluate`: the hold-out CA after a cell.",
            "",
            markdown_table(["BadNet", *variants, "evaluate"], rows),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    code = commit()
    configure_threads()
    entries = []
    for name in NETS:
        print(f"{name} ...", flush=True)
        cost = measure(name, args.repeats)
        entries.append({"name": name, **provenance(code, "cpu", date=False), "cost": cost})
        print(entries[-1], flush=True)
    write_results(Path(args.out), STEM, entries, markdown(entries), COMMAND, code=code)


if __name__ == "__main__":
    main()
