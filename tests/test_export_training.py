"""``torch.export`` BadNets handled like any other: a program exported the way torch's docs
show (a batch dimension with an upper bound) goes through pre-deployment and repair with batch
norm and dropout in training behaviour, and its retrained copies keep the user's bound."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from models.bundle import load_bundle
from models.exported import NotTrainableError
from models.importing import import_net
from models.nets import Net
from models.spec import InputSpec
from nnoculation.badnets import load_splits
from nnoculation.cli import EXIT_BAD_INPUT, main
from nnoculation.recipes import default_recipe
from nnoculation.repair.engine import RepairConfig, repair, write_repaired_bundle
from nnoculation.repair.reverse import MEAN_DIFF
from nnoculation.training import TrainConfig, train

SPEC = InputSpec(1, 8, 8)  # scikit-learn digits, as the CLI's --dataset digits gives them
NUM_CLASSES = 10
BATCH_MAX = 4096
GRID = ["--dataset", "digits", "--alpha0", "1e-3", "--mean", "0", "--std", "1",
        "--alpha-multiples", "1", "--gammas", "0.3", "--epochs", "1",
        "--theta", "0.99"]  # fmt: skip


class BnDropoutNet(nn.Module):
    """A user's own classifier: convolution, batch norm, dropout, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8 * 8 * 8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def export_as_the_docs_show(module: nn.Module, path: Path, decompose: bool = False) -> Path:
    """``torch.export.export`` with ``Dim("batch", max=4096)``, then ``torch.export.save``."""
    example = (torch.zeros(8, *SPEC.shape),)
    batch = torch.export.Dim("batch", max=BATCH_MAX)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    if decompose:
        program = program.run_decompositions()
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def badnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pt2 BadNet trained one epoch on the digits attacker split, exported in eval mode."""
    torch.manual_seed(0)
    module = BnDropoutNet()
    attacker = load_splits(default_recipe("digits")).attacker
    train(Net(module, "export", SPEC, NUM_CLASSES), attacker, TrainConfig(epochs=1), progress=False)
    path = tmp_path_factory.mktemp("pt2") / "bad.pt2"
    return export_as_the_docs_show(module.eval(), path)


def bn_stats(net: Net) -> dict[str, torch.Tensor]:
    """The batch-norm running statistics of a net, by name."""
    return {
        name: tensor.detach().clone()
        for name, tensor in net.module.state_dict().items()
        if name.startswith("bn.running_")
    }


def batch_bound(path: Path) -> int:
    """The upper bound of the batch dimension of a .pt2 file we wrote ourselves."""
    program = torch.export.load(io.BytesIO(path.read_bytes()))
    (bounds,) = program.range_constraints.values()
    return int(bounds.upper)


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SPEC.shape), dtype=torch.uint8, generator=g)


def test_imported_program_has_train_and_eval_behaviour(badnet_file: Path) -> None:
    net = import_net(badnet_file, SPEC, NUM_CLASSES)
    before, x = bn_stats(net), images(16)
    assert set(before) == {"bn.running_mean", "bn.running_var"}
    with torch.no_grad():
        net.train_mode(False)
        assert torch.equal(net.logits(x), net.logits(x))  # eval: no dropout
        assert all(torch.equal(before[k], v) for k, v in bn_stats(net).items())
        copy = net.clone().train_mode(True)
        assert not torch.equal(copy.logits(x), copy.logits(x))  # train: dropout is on
    after = bn_stats(copy)
    assert not torch.equal(after["bn.running_mean"], before["bn.running_mean"])
    assert all(torch.equal(before[k], v) for k, v in bn_stats(net).items())  # clone independent


def test_bounded_pt2_badnet_goes_through_predeploy_and_repair(
    badnet_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(["predeploy", "--badnet", str(badnet_file), *GRID, "--out", str(out)]) == 0
    bundle = load_bundle(out / "bundle")
    assert {bundle.manifest.nets[r].format for r in ("badnet", "goodnet")} == {"export"}
    for role in ("badnet", "goodnet"):
        assert batch_bound(out / "bundle" / f"{role}.pt2") == BATCH_MAX
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    imported = bn_stats(import_net(badnet_file, SPEC, NUM_CLASSES))
    assert all(torch.equal(imported[k], v) for k, v in bn_stats(badnet).items())
    retrained = bn_stats(goodnet)
    assert all(not torch.equal(imported[k], retrained[k]) for k in imported)

    quarantine = images(40, seed=1)
    quarantine[:, :, -3:, -3:] = 255  # a corner patch stands in for the attacker's trigger
    cfg = RepairConfig(profile=MEAN_DIFF, finetune_epochs=1, theta=0.99)
    outcome = repair(bundle, quarantine, cfg, progress=False)
    assert outcome.passed_gate, outcome.reason
    for role, before in (("badnet", imported), ("goodnet", retrained)):
        after = bn_stats(getattr(outcome, role))
        assert all(not torch.equal(before[k], after[k]) for k in before), role
    write_repaired_bundle(outcome, bundle, tmp_path / "v2", "v0002")
    for role in ("badnet", "goodnet"):
        assert batch_bound(tmp_path / "v2" / f"{role}.pt2") == BATCH_MAX
    repaired = load_bundle(tmp_path / "v2").net("goodnet")
    assert torch.equal(repaired.predict(images(8)), outcome.goodnet.predict(images(8)))


def test_a_program_whose_training_behaviour_is_lost_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Decomposed in training mode: batch norm is a functional op whose statistics the graph
    # copies back itself, with no mode argument to follow; training it is refused up front.
    torch.manual_seed(0)
    path = export_as_the_docs_show(BnDropoutNet().train(), tmp_path / "bad.pt2", decompose=True)
    net = import_net(path, SPEC, NUM_CLASSES)
    with pytest.raises(NotTrainableError, match="batch_norm"):
        net.check_trainable()
    out = tmp_path / "out"
    assert main(["predeploy", "--badnet", str(path), *GRID, "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot be retrained" in err and "run_decompositions" in err
    assert not out.exists()  # refused before the search, not after it


def test_a_failed_save_keeps_the_search(
    badnet_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("torch refused the export")

    monkeypatch.setattr(torch.export, "export", refuse)
    out = tmp_path / "out"
    assert main(["predeploy", "--badnet", str(badnet_file), *GRID, "--out", str(out)]) == 4
    err = capsys.readouterr().err.strip()
    # one error line (warnings about the pick, e.g. at the grid's edge, may precede it)
    errors = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "torch refused the export" in errors[0] and "report.json" in errors[0]
    report = json.loads((out / "report.json").read_text())
    assert report["alpha"] == pytest.approx(1e-3) and report["gamma"] == pytest.approx(0.3)
    assert (out / "goodnet_weights.safetensors").exists()
    assert not (out / "bundle").exists()
