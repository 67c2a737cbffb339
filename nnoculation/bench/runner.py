"""Run a bench config cell by cell: reuse what the same code already measured, measure the
rest with a line of progress per cell, and write the results once every cell of the plan is
there (``nnoculation bench``; docs/bench.md)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnoculation.bench.aggregate import Row
from nnoculation.bench.aggregate import entries as aggregate_entries
from nnoculation.bench.cells import (
    CellKey,
    Measured,
    cell_record,
    is_clean,
    read_cell,
    reusable,
    selected,
    settings_hash,
    stale,
    write_json_atomic,
)
from nnoculation.bench.config import BenchConfig, ConfigError, load_config
from nnoculation.bench.output import COMMAND, write_outputs
from nnoculation.benchmarks.common import commit as code_commit
from nnoculation.benchmarks.common import fmt

Measure = Callable[[CellKey], Measured]


@dataclass
class BenchRun:
    """What a run did: cells measured and reused, cells of the plan still missing (another
    ``--only-cells`` run, or an older commit's), and the results file when it was written."""

    measured: list[CellKey] = field(default_factory=list)
    reused: list[CellKey] = field(default_factory=list)
    missing: list[CellKey] = field(default_factory=list)
    stale: list[CellKey] = field(default_factory=list)  # reused, then measured again
    results: Path | None = None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def run_bench(
    cfg: BenchConfig,
    *,
    command: str,
    out_dir: Path,
    runs_dir: Path,
    commit: str,
    only: list[str] | None = None,
    measure: Measure | None = None,
    echo: Callable[[str], None] = print,
    cells_dir: Path | None = None,
) -> BenchRun:
    """Measure the cells of ``cfg`` (those ``only`` selects) that ``commit`` has not already
    measured with the same settings, then, when the whole plan is there, write the results.

    Cells are read and written in ``cells_dir`` (default ``runs_dir/NAME/cells``): a folder
    that travels (committed, copied) lets a matrix longer than one sitting resume on another
    machine at the same commit; a resumed cell measured on other models than this run's is
    measured again (:func:`nnoculation.bench.cells.stale`). ``measure`` defaults to the real
    chain (:class:`nnoculation.bench.chain.Chain`); tests pass their own.
    """
    plan = cfg.cells()
    chosen = [k for k in plan if selected(k, only)]
    if not chosen:
        raise ConfigError(
            f"--only-cells {' '.join(only or [])} selects no cell of {cfg.name!r}; cells are "
            f"{'variant/' if cfg.variants else ''}attack/defense/seed, e.g. {plan[0].id}"
        )
    cells_dir = cells_dir if cells_dir is not None else runs_dir / cfg.name / "cells"
    hashes = {k: settings_hash(cfg.cell_settings(k)) for k in plan}
    done: dict[CellKey, dict[str, Any]] = {}
    for k in plan:
        record = read_cell(cells_dir / k.filename)
        if record is not None and reusable(record, commit, hashes[k]):
            done[k] = record
    run = BenchRun(reused=[k for k in chosen if k in done])
    todo = [k for k in chosen if k not in done]
    if not is_clean(commit):
        echo(f"warning: code at {commit}: no cell is reused and results are not to be committed")
    echo(
        f"{cfg.name}: {len(plan)} cells, {len(chosen)} selected, {len(run.reused)} reused "
        f"(same commit and settings), {len(todo)} to measure"
    )
    if measure is None:
        from nnoculation.bench.chain import Chain  # the attack suite and training, when needed

        measure = Chain(cfg, runs_dir / cfg.name / "work", commit).measure
    spent = 0.0
    while todo:
        for i, key in enumerate(todo, start=1):
            t0 = time.perf_counter()
            record = cell_record(key, measure(key), commit, hashes[key])
            write_json_atomic(cells_dir / key.filename, record)
            done[key] = record
            run.measured.append(key)
            spent += time.perf_counter() - t0
            eta = spent / len(run.measured) * (len(todo) - i)
            echo(
                f"[{i}/{len(todo)}] {key.id}: CA {fmt(record['ca'])} ASR {fmt(record['asr'])} "
                f"floor {fmt(record['floor'])}, {record['seconds']:.0f} s defense "
                f"({_duration(time.perf_counter() - t0)} wall; ETA {_duration(eta)})"
            )
        todo = []
        for key in stale(done, run.measured):
            # Measured on models this run re-made differently: measure it again (when
            # selected) or drop it, so the cells of one seed describe one BadNet and GoodNet.
            del done[key]
            run.stale.append(key)
            if key in run.reused:
                run.reused.remove(key)
            if selected(key, only):
                todo.append(key)
            else:
                (cells_dir / key.filename).unlink(missing_ok=True)
        if todo:
            echo(
                f"{len(todo)} resumed cells were measured on other models than this run made "
                f"(e.g. {todo[0].id}): measuring them again"
            )
    run.missing = [k for k in plan if k not in done]
    if run.missing:
        echo(
            f"{len(run.missing)} of {len(plan)} cells not yet measured by this code "
            f"(e.g. {run.missing[0].id}): results not written"
        )
        return run
    rows = [
        Row(v.name, v.x, tuple(cfg.variant_config(v.name).oracle_defenses())) for v in cfg.variants
    ]
    found = aggregate_entries(
        [done[k] for k in plan], cfg.attacks, cfg.defenses, cfg.seeds, cfg.oracle_defenses(), rows
    )
    run.results = write_outputs(cfg, found, command, out_dir)
    echo(f"wrote {run.results} (+ .md, .png)")
    return run


def run_from_file(
    config: str,
    out_dir: Path,
    runs_dir: Path,
    only: list[str] | None = None,
    cells_dir: Path | None = None,
) -> BenchRun:
    """``nnoculation bench CONFIG``: the config validated whole, then :func:`run_bench` at the
    working tree's commit."""
    cfg = load_config(config)
    return run_bench(
        cfg,
        command=f"{COMMAND} {config}",
        out_dir=out_dir,
        runs_dir=runs_dir,
        commit=code_commit(),
        only=only,
        cells_dir=cells_dir,
    )
