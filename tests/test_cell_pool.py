"""Cells in worker processes (``workers > 1``) keep the search's answer: the same cells in the
same order with the hold-out CA and weights of the in-process search (to float rounding: one
thread per worker adds in another order), the whole grid's pick, no worker left behind when
the search stops early, and the same for a TorchScript and a bounded ``.pt2`` BadNet with
batch norm and dropout, whose statistics the workers update."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from models.importing import import_net
from models.nets import Net
from nnoculation.cell_pool import cells_in_order, stop_pool, worker_threads
from nnoculation.cli import EXIT_USAGE, main
from nnoculation.data.imageset import ImageSet
from nnoculation.predeploy import Cell, PredeployConfig, run_predeploy, search_order
from nnoculation.training import TrainConfig, train
from tests.conftest import synthetic_set
from tests.test_cli import import_argv
from tests.test_export_training import NUM_CLASSES as PT2_CLASSES
from tests.test_export_training import SPEC, BnDropoutNet, export_as_the_docs_show

CA_TOL = 0.02  # a hold-out image may flip when weights differ in the last float bits
WEIGHT_TOL = 1e-3

GRID = dict(
    alpha0=1e-3, alpha_multiples=(1.0, 100.0, 300.0), gammas=(0.2, 0.6), epochs=2, batch_size=32,
    theta=0.05,
)  # fmt: skip


def _badnet(tiny_net: Net) -> Net:
    train(tiny_net, synthetic_set(400, seed=1), TrainConfig(epochs=3, batch_size=32, lr=3e-3),
          progress=False)  # fmt: skip
    return tiny_net


def _max_diff(a: Net, b: Net) -> float:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def _keys(cells: list[Cell]) -> list[tuple[float, float]]:
    return [(c.alpha, c.gamma) for c in cells]


def _pool_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("nnoc-cells-*"))


def _no_pool_left(before: set[Path]) -> None:
    """No worker alive and no pool directory left but those that were there before the test
    (the temp dir is shared: another run on the machine may hold one of its own)."""
    assert mp.active_children() == []
    assert _pool_dirs() <= before


def test_pooled_search_keeps_the_in_process_answer_and_stops_its_workers(tiny_net: Net) -> None:
    pool_dirs = _pool_dirs()
    badnet = _badnet(tiny_net)
    retrain, holdout = synthetic_set(120, seed=2), synthetic_set(80, seed=3)
    alone = run_predeploy(badnet, retrain, holdout, PredeployConfig(**GRID, full_grid=True))
    pooled = run_predeploy(
        badnet, retrain, holdout, PredeployConfig(**GRID, full_grid=True, workers=2)
    )
    assert (
        _keys(pooled.cells)
        == _keys(alone.cells)
        == search_order(alone.config.alphas, alone.config.gammas)
    )
    for a, p in zip(alone.cells, pooled.cells, strict=True):
        assert p.holdout_ca == pytest.approx(a.holdout_ca, abs=CA_TOL)
    assert alone.picked is not None and pooled.picked is not None
    assert (pooled.picked.alpha, pooled.picked.gamma) == (alone.picked.alpha, alone.picked.gamma)
    assert alone.goodnet is not None and pooled.goodnet is not None
    assert _max_diff(alone.goodnet, badnet) > 0
    assert _max_diff(pooled.goodnet, alone.goodnet) < WEIGHT_TOL
    assert pooled.extra["workers"] == 2 and pooled.goodnet.format == "zoo"
    # the search (not the whole grid) stops at the first eligible cell and ends every worker
    search = run_predeploy(badnet, retrain, holdout, PredeployConfig(**GRID, workers=2))
    first = next(k for k, c in enumerate(alone.cells) if c is alone.picked)
    assert search.cells_trained == first + 1 < len(alone.cells)
    assert search.picked is not None and search.goodnet is not None
    assert _keys([search.picked]) == _keys([alone.picked])  # the cell, not only its alpha
    assert _max_diff(search.goodnet, alone.goodnet) < WEIGHT_TOL  # and that cell's net
    _no_pool_left(pool_dirs)


def test_closing_the_stream_early_terminates_the_pool(tiny_net: Net) -> None:
    pool_dirs = _pool_dirs()
    badnet = _badnet(tiny_net)
    retrain, holdout = synthetic_set(120, seed=2), synthetic_set(80, seed=3)
    cfg = PredeployConfig(**GRID, workers=2)
    order = search_order(cfg.alphas, cfg.gammas)
    stream = cells_in_order(badnet, retrain, holdout, order, cfg, None, baseline_ca=0.0)
    cell, net = next(stream)  # baseline 0: every cell is eligible, so its weights come back
    assert (cell.alpha, cell.gamma) == order[0] and net is not None
    assert len(mp.active_children()) == 2
    stream.close()
    _no_pool_left(pool_dirs)


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_torchscript_and_bounded_pt2_badnets_train_in_workers(tmp_path: Path, fmt: str) -> None:
    pool_dirs = _pool_dirs()
    torch.manual_seed(0)
    module = BnDropoutNet().eval()
    if fmt == "torchscript":
        path = tmp_path / "bad.pt"
        torch.jit.save(torch.jit.script(module), str(path))
    else:
        path = export_as_the_docs_show(module, tmp_path / "bad.pt2")
    badnet = import_net(path, SPEC, PT2_CLASSES)
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> ImageSet:
        images = torch.randint(0, 256, (n, *SPEC.shape), dtype=torch.uint8, generator=g)
        return ImageSet(images, torch.randint(0, PT2_CLASSES, (n,), generator=g),
                        tuple("abcdefghij"))  # fmt: skip

    retrain, holdout = data(96), data(48)
    # SGD: the conv bias feeds a batch norm, Adam would blow its rounding noise up (see
    # test_batched_cells); theta 1: every cell is eligible, the first is the pick
    grid = dict(alpha0=1e-3, alpha_multiples=(1.0, 5.0), gammas=(0.3,), epochs=2,
                batch_size=32, optimizer="sgd", theta=0.99)  # fmt: skip
    alone = run_predeploy(badnet, retrain, holdout, PredeployConfig(**grid))  # type: ignore[arg-type]
    pooled = run_predeploy(badnet, retrain, holdout, PredeployConfig(**grid, workers=2))  # type: ignore[arg-type]
    assert alone.goodnet is not None and pooled.goodnet is not None
    assert pooled.goodnet.format == badnet.format
    assert _max_diff(pooled.goodnet, alone.goodnet) < WEIGHT_TOL
    stats = [k for k in badnet.module.state_dict() if "running_mean" in k]
    assert stats, "the BadNet has batch-norm statistics"
    before, after = badnet.module.state_dict(), pooled.goodnet.module.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # updated in the worker
    _no_pool_left(pool_dirs)


def test_bad_worker_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1"):
        PredeployConfig(alpha0=1e-3, workers=0)
    with pytest.raises(ValueError, match="workers or cells_at_once"):
        PredeployConfig(alpha0=1e-3, workers=2, cells_at_once=2)
    assert worker_threads(2, threads=2) == 1 and worker_threads(4, threads=2) == 1
    assert worker_threads(2, threads=8) == 4


def test_cli_workers_keep_the_pick_and_refuse_batching_beside_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = {"alpha_multiples": "1,3", "gammas": "0.2,0.5", "theta": "0.05", "epochs": "1"}
    reports = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        argv = import_argv(tmp_path, out=str(out), workers=workers, **grid)
        assert main([*argv, "--full-grid"]) == 0, capsys.readouterr().err
        reports[workers] = json.loads((out / "report.json").read_text())
    one, two = reports["1"], reports["2"]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert (two["alpha"], two["gamma"]) == (one["alpha"], one["gamma"])
    assert [c["holdout_ca"] for c in two["cells"]] == pytest.approx(
        [c["holdout_ca"] for c in one["cells"]], abs=CA_TOL
    )
    capsys.readouterr()
    argv = import_argv(tmp_path, out=str(tmp_path / "refused"), workers="2", cells_at_once="2")
    assert main(argv) == EXIT_USAGE
    assert "--cells-at-once" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    for bad in ("0", "many"):
        assert main(import_argv(tmp_path, workers=bad)) == EXIT_USAGE
        assert "--workers" in capsys.readouterr().err


STOPS_EARLY = """
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from nnoculation.predeploy import PredeployConfig, run_predeploy
from tests.conftest import NUM_CLASSES, SIDE, synthetic_set

if __name__ == "__main__":
    spec = InputSpec(1, SIDE, SIDE, (0.3,), (0.3,))
    net = Net(build_classifier("small_cnn", spec, NUM_CLASSES, width=4), "zoo", spec,
              NUM_CLASSES, "small_cnn", {"width": 4})
    cfg = PredeployConfig(alpha0=1e-3, alpha_multiples=(1.0, 2.0, 3.0, 4.0), gammas=(0.2,),
                          epochs=5, theta=0.99, workers=2)
    print(run_predeploy(net, synthetic_set(3000, seed=1), synthetic_set(50, seed=2), cfg)
          .cells_trained)
"""


def test_a_search_that_stops_early_leaves_nothing_behind(tmp_path: Path) -> None:
    # theta 0.99: the first cell is the pick, and the other worker is terminated mid-cell (a
    # cell takes longer than the workers' start-up jitter: both start a cell together)
    script = tmp_path / "stops_early.py"
    script.write_text(STOPS_EARLY)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=root, env=env,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_stopping_the_pool_kills_its_workers_when_terminate_trips_on_cpythons_race() -> None:
    """``Pool.terminate`` can raise before it kills the workers (the race stop_pool names);
    the workers must not outlive the search then."""
    pool = mp.get_context("spawn").Pool(1)
    pool.apply_async(time.sleep, (60,))
    [worker] = list(pool._pool)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while not worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)

    def tripped() -> None:
        raise AssertionError("Cannot have cache with result_hander not alive")

    pool.terminate = tripped  # type: ignore[method-assign]
    started = time.monotonic()
    stop_pool(pool)
    assert not worker.is_alive() and time.monotonic() - started < 10
