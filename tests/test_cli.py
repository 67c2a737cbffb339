"""The command line end to end on small real data (scikit-learn digits): imported BadNets stay
in their format through pre-deployment, and user errors give clear exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.bundle import load_bundle
from models.classifiers import build_classifier
from models.spec import InputSpec
from nnoculation.cli import EXIT_BAD_INPUT, EXIT_USAGE, main

DIGITS_SPEC = InputSpec(1, 8, 8)
GRID = ["--alpha0", "1e-3", "--mean", "0", "--std", "1", "--alpha-multiples", "1",
        "--gammas", "0.3", "--epochs", "1", "--theta", "0.99"]  # fmt: skip


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("small_cnn", DIGITS_SPEC, 10, width=4)


def test_predeploy_an_imported_safetensors_badnet(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_module().state_dict(), str(tmp_path / "bad.safetensors"))
    out = tmp_path / "out"
    argv = ["predeploy", "--badnet", str(tmp_path / "bad.safetensors"), "--arch", "small_cnn",
            "--dataset", "digits", *GRID, "--out", str(out)]  # fmt: skip
    # width=4 is not the zoo default, so a plain --arch import must fail loudly ...
    assert main(argv) == EXIT_BAD_INPUT
    argv[argv.index("small_cnn") + 1 : argv.index("small_cnn") + 1] = [
        "--arch-kwargs",
        '{"width": 4}',
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["cells_trained"] == 1 and report["alpha"] == pytest.approx(1e-3)
    bundle = load_bundle(out / "bundle")
    assert bundle.manifest.nets["goodnet"].format == "zoo"


def test_torchscript_badnet_stays_torchscript(tmp_path: Path) -> None:
    scripted = torch.jit.script(_module())
    torch.jit.save(scripted, str(tmp_path / "bad.pt"))
    out = tmp_path / "out"
    argv = ["predeploy", "--badnet", str(tmp_path / "bad.pt"), "--dataset", "digits", *GRID,
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    bundle = load_bundle(out / "bundle")
    assert {bundle.manifest.nets[r].format for r in ("badnet", "goodnet")} == {"torchscript"}


def test_missing_data_and_missing_alpha0_are_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predeploy", "--badnet", str(tmp_path / "nope.pt"), "--alpha0", "1e-3", "--mean", "0",
            "--std", "1",
            "--dataset", str(tmp_path / "none.npz"), "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == EXIT_BAD_INPUT
    assert "no such file" in capsys.readouterr().err
    argv = ["predeploy", "--badnet", str(tmp_path / "x.pt"), "--dataset", "digits",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    assert "--alpha0" in capsys.readouterr().err
    argv = ["predeploy", "--badnet", str(tmp_path / "x.pt"), "--alpha0", "1e-3", "--mean", "0",
            "--std", "1", "--theta", "3",
            "--dataset", "digits", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == EXIT_BAD_INPUT  # the file is missing: reported before the grid runs


def test_stream_and_repair_give_clear_errors_for_wrong_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stream", "--bundle", str(tmp_path), "--out", str(tmp_path / "q.npz")]) == 4
    assert "manifest" in capsys.readouterr().err


def test_list_attacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "attacks"]) == 0
    names = capsys.readouterr().out.split()
    assert {"patch", "all-to-all", "tca", "wanet", "adaptive"} <= set(names)
