"""Batched grid cells give the weights of cells trained alone; the faster searches (batched,
pruned, ``--exact``) keep the whole grid's pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from nnoculation.batched import CellJob, batch_refusal, train_batched
from nnoculation.cli import EXIT_USAGE, main
from nnoculation.data.imageset import ImageSet
from nnoculation.predeploy import (
    Cell,
    PredeployConfig,
    false_stops,
    retraining_data,
    run_predeploy,
)
from nnoculation.training import TrainConfig, train
from tests.conftest import NUM_CLASSES, synthetic_set
from tests.test_cli import import_argv

# Batched kernels add in another order than one cell's, and how far that moves the weights
# depends on the CPU's kernels: under 2e-5 on the earlier sessions' machines, 2.7e-5 on an AMD
# EPYC. Still far below what a wrong batch would give (training moves them by > 1e-3).
ATOL = 1e-4


def _net(spec: InputSpec, arch: str, **kwargs: object) -> Net:
    torch.manual_seed(0)
    module = build_classifier(arch, spec, NUM_CLASSES, **kwargs)
    return Net(module, "zoo", spec, NUM_CLASSES, arch, dict(kwargs))


def _jobs(fresh_seed: int) -> list[CellJob]:
    """Three cells: two learning rates on one static noisy copy, one on fresh noise (a stateful
    stream: made anew for every run so the batched and the lone run draw the same noise)."""
    data = synthetic_set(96, seed=2)
    return [
        CellJob(1e-3, retraining_data(data, 0.2, 0, fresh_noise=False)),
        CellJob(4e-3, retraining_data(data, 0.2, 0, fresh_noise=False)),
        CellJob(2e-3, retraining_data(data, 0.5, fresh_seed, fresh_noise=True)),
    ]


def _alone(net: Net, job: CellJob, cfg: TrainConfig) -> Net:
    """``job``'s cell trained by itself from ``net``, as train() trains it outside a batch."""
    alone = net.clone()
    train(alone, job.data, cfg.with_(lr=job.lr), progress=False)
    return alone


def _max_diff(a: Net, b: Net) -> float:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


@pytest.mark.parametrize(
    ("arch", "kwargs", "optimizer"),
    [
        ("small_cnn", {"width": 4}, "adam"),
        ("small_cnn", {"width": 4, "dropout": 0.3}, "sgd"),  # dropout masks follow the seed
        ("cifar_cnn", {"width": 4}, "adam"),  # BatchNorm: running statistics too
        ("cifar_cnn", {"width": 4}, "sgd"),
    ],
)
def test_batched_cells_give_the_weights_of_cells_trained_alone(
    tiny_spec: InputSpec, arch: str, kwargs: dict[str, object], optimizer: str
) -> None:
    net = _net(tiny_spec, arch, **kwargs)
    before = net.clone()
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer=optimizer, seed=3)  # type: ignore[arg-type]
    batched = train_batched(net, _jobs(fresh_seed=7), cfg)
    assert _max_diff(net, before) == 0.0, "the BadNet itself must not change"
    assert batched.epochs_done == [2, 2, 2]
    for job, got in zip(_jobs(fresh_seed=7), batched.nets, strict=True):
        alone = _alone(net, job, cfg)
        assert _max_diff(alone, before) > 1e-3, "training must move the weights"
        assert _max_diff(got, alone) < ATOL
        assert not got.module.training
    if arch == "cifar_cnn":
        stats = [dict(n.module.named_buffers()) for n in batched.nets]
        name = next(k for k in stats[0] if k.endswith("running_mean"))
        assert not torch.equal(stats[0][name], stats[2][name]), "each cell keeps its own stats"
        counts = [k for k in stats[0] if k.endswith("num_batches_tracked")]
        assert int(stats[0][counts[0]]) == 2 * (192 // 32)


def test_cells_sharing_one_training_set_share_the_input_batch(tiny_spec: InputSpec) -> None:
    # Same data tensors and the same order: the batched model takes one unbatched input.
    net = _net(tiny_spec, "cifar_cnn", width=4)
    data = retraining_data(synthetic_set(64, seed=5), 0.4, 0, fresh_noise=False)
    jobs = [CellJob(lr, data) for lr in (1e-3, 3e-3, 9e-3)]
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="sgd")
    out = train_batched(net, jobs, cfg)
    for job, got in zip(jobs, out.nets, strict=True):
        alone = _alone(net, job, cfg)
        assert _max_diff(got, alone) < ATOL


def test_a_cell_stopped_after_an_epoch_is_the_cell_trained_for_that_epoch(
    tiny_spec: InputSpec,
) -> None:
    net = _net(tiny_spec, "cifar_cnn", width=4)
    cfg = TrainConfig(epochs=3, batch_size=32, seed=1)
    calls: list[tuple[int, list[int]]] = []

    def stop_the_second(done: int, active: list[int], nets: list[Net]) -> list[bool]:
        calls.append((done, active))
        assert all(not n.module.training for n in nets)
        return [k != 1 for k in active]

    out = train_batched(net, _jobs(fresh_seed=1), cfg, stop_the_second)
    assert out.epochs_done == [3, 1, 3]
    assert calls == [(1, [0, 1, 2]), (2, [0, 2])]
    job = _jobs(fresh_seed=1)[1]
    one_epoch = _alone(net, job, cfg.with_(epochs=1))
    assert _max_diff(out.nets[1], one_epoch) < ATOL
    full = _alone(net, _jobs(fresh_seed=1)[2], cfg)
    assert _max_diff(out.nets[2], full) < ATOL


def test_an_imported_pt2_program_with_batch_norm_and_dropout_trains_batched(
    tmp_path: Path,
) -> None:
    # SGD: this net's conv bias feeds a batch norm, so its true gradient is 0 and Adam would
    # scale the rounding noise of either run up to steps of the learning rate's size.
    from models.importing import import_net
    from tests.test_export_training import SPEC, BnDropoutNet, export_as_the_docs_show

    torch.manual_seed(0)
    path = export_as_the_docs_show(BnDropoutNet().eval(), tmp_path / "bad.pt2")
    net = import_net(path, SPEC, 10)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (96, *SPEC.shape), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (96,), generator=g),
        tuple("abcdefghij"),
    )
    jobs = [CellJob(1e-3, data), CellJob(5e-3, data)]
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd")
    out = train_batched(net, jobs, cfg)
    for job, got in zip(jobs, out.nets, strict=True):
        alone = _alone(net, job, cfg)
        assert _max_diff(got, alone) < ATOL
        assert _max_diff(got, net) > 1e-3  # running statistics and weights moved
    assert got.format == "export"


def test_torchscript_nets_are_not_batched_and_bad_jobs_are_refused(tiny_net: Net) -> None:
    scripted = Net(torch.jit.script(tiny_net.module), "torchscript", tiny_net.spec, NUM_CLASSES)
    assert batch_refusal(scripted) is not None and batch_refusal(tiny_net) is None
    with pytest.raises(ValueError, match="TorchScript"):
        train_batched(scripted, _jobs(0), TrainConfig())
    with pytest.raises(ValueError, match="at least one job"):
        train_batched(tiny_net, [], TrainConfig())


def _tiny_badnet(tiny_net: Net) -> Net:
    train(tiny_net, synthetic_set(400, seed=1), TrainConfig(epochs=3, batch_size=32, lr=3e-3),
          progress=False)  # fmt: skip
    return tiny_net


GRID = dict(
    alpha0=1e-3, alpha_multiples=(1.0, 100.0, 300.0), gammas=(0.2, 0.6), epochs=2, batch_size=32,
    theta=0.05,
)  # fmt: skip


def _key(cell: Cell | None) -> tuple[float, float] | None:
    return None if cell is None else (cell.alpha, cell.gamma)


def test_exact_batched_and_pruned_searches_keep_the_whole_grids_pick(tiny_net: Net) -> None:
    badnet = _tiny_badnet(tiny_net)
    retrain, holdout = synthetic_set(120, seed=2), synthetic_set(80, seed=3)
    full = run_predeploy(
        badnet, retrain, holdout, PredeployConfig(**GRID, full_grid=True, track_epochs=True)
    )
    assert full.cells_trained == 6 and full.picked is not None
    # the grid makes the search work: only the fourth cell in search order is eligible (its
    # hold-out CA is low after the first epoch: a margin-0 pruning stops it falsely)
    assert [c.holdout_ca >= full.baseline_ca - 0.05 for c in full.cells[:4]] == [0, 0, 0, 1]
    assert _key(full.picked) == (0.1, 0.2)
    exact = run_predeploy(badnet, retrain, holdout, PredeployConfig(**GRID, exact=True))
    assert _key(exact.picked) == _key(full.picked) and exact.config.mode == "exact"
    assert exact.picked is not None and full.picked is not None
    assert exact.picked.holdout_ca == full.picked.holdout_ca
    assert exact.cells_trained < full.cells_trained
    batched = run_predeploy(badnet, retrain, holdout, PredeployConfig(**GRID, cells_at_once=2))
    assert batched.extra["batched"] and _key(batched.picked) == _key(full.picked)
    assert batched.picked is not None and batched.goodnet is not None
    assert batched.picked.holdout_ca == pytest.approx(full.picked.holdout_ca, abs=0.02)
    # A pruned search does what false_stops says it would, computed from the whole grid:
    # margin 0 stops the rule's pick after its first epoch (a false stop), margin 0.5 does not.
    for margin, false in ((0.0, [[0.1, 0.2]]), (0.5, [])):
        offline = false_stops(full.cells, full.baseline_ca, 0.05, margin)
        assert offline["false_stops"] == false and offline["stopped"] >= 1
        cfg = PredeployConfig(**GRID, prune_margin=margin)
        pruned = run_predeploy(badnet, retrain, holdout, cfg)
        assert pruned.config.mode == f"pruned (margin {margin:g})"
        assert list(_key(pruned.picked) or []) == offline["pick"]
        assert (_key(pruned.picked) == _key(full.picked)) == (not false)
        stopped = [c for c in pruned.cells if c.pruned_after is not None]
        assert stopped and all(c.pruned_after == 1 and c.epoch_cas for c in stopped)
        assert json.loads(json.dumps(pruned.to_dict()))["mode"] == cfg.mode


def test_false_stops_counts_stopped_cells_that_end_eligible() -> None:
    cells = [
        Cell(0.004, 0.6, 0.50, 0.0, epoch_cas=[0.40, 0.45, 0.50]),  # stopped, rightly
        Cell(0.004, 0.3, 0.89, 0.0, epoch_cas=[0.60, 0.85, 0.89]),  # stopped, wrongly
        Cell(0.002, 0.6, 0.90, 0.0, epoch_cas=[0.85, 0.88, 0.90]),
    ]
    report = false_stops(cells, baseline_ca=0.91, theta=0.03, margin=0.2)
    assert report["stopped"] == 2 and report["false_stops"] == [[0.004, 0.3]]
    assert report["false_stop_rate"] == pytest.approx(0.5)
    assert report["pick"] == [0.002, 0.6]  # the rule's pick, [0.004, 0.3], was stopped
    assert report["epochs_saved"] == 4 and report["epochs_total"] == 9
    assert false_stops(cells, 0.91, 0.03, margin=0.5)["pick"] == [0.004, 0.3]


def test_shortcuts_are_refused_under_exact() -> None:
    with pytest.raises(ValueError, match="exact"):
        PredeployConfig(alpha0=1e-3, exact=True, prune_margin=0.2)
    with pytest.raises(ValueError, match="full_grid"):
        PredeployConfig(alpha0=1e-3, full_grid=True, prune_margin=0.2)
    with pytest.raises(ValueError, match="cells_at_once"):
        PredeployConfig(alpha0=1e-3, cells_at_once=0)


def test_cli_exact_reproduces_full_grid_and_refuses_pruning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = {"alpha_multiples": "1,3", "gammas": "0.2,0.5", "theta": "0.05", "epochs": "1"}
    reports = {}
    for flag in ("--exact", "--full-grid"):
        argv = import_argv(tmp_path, out=str(tmp_path / flag.strip("-")), **grid)
        assert main([*argv, flag]) == 0, capsys.readouterr().err
        reports[flag] = json.loads((tmp_path / flag.strip("-") / "report.json").read_text())
    exact, full = reports["--exact"], reports["--full-grid"]
    assert (exact["alpha"], exact["gamma"]) == (full["alpha"], full["gamma"])
    assert exact["mode"] == "exact" and full["mode"] == "full-grid"
    assert full["cells_trained"] == 4 and exact["cells_trained"] <= 4
    argv = import_argv(tmp_path, out=str(tmp_path / "pruned"), **grid)
    assert main([*argv, "--prune-margin", "0.5", "--cells-at-once", "2"]) == 0
    pruned = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert pruned["mode"] == "pruned (margin 0.5)" and pruned["batched"]
    assert (pruned["alpha"], pruned["gamma"]) == (full["alpha"], full["gamma"])
    capsys.readouterr()
    argv = import_argv(tmp_path, out=str(tmp_path / "refused"))
    assert main([*argv, "--exact", "--prune-margin", "0.2"]) == EXIT_USAGE
    assert "not provably exact" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
