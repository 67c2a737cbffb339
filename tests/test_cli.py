"""The command line end to end on small real data (scikit-learn digits): imported BadNets stay
in their format through pre-deployment, and user errors give one clear line and the documented
exit code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from models.store import ModelStore
from nnoculation.bundle_io import write_bundle_dir
from nnoculation.cli import EXIT_BAD_INPUT, EXIT_USAGE, main
from nnoculation.pipeline import VALIDATION_GROUP

DIGITS_SPEC = InputSpec(1, 8, 8)
GRID = ["--alpha0", "1e-3", "--mean", "0", "--std", "1", "--alpha-multiples", "1",
        "--gammas", "0.3", "--epochs", "1", "--theta", "0.99"]  # fmt: skip


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("small_cnn", DIGITS_SPEC, 10, width=4)


def import_argv(tmp_path: Path, **options: str) -> list[str]:
    """A valid predeploy of an imported safetensors BadNet (``test_predeploy_an_imported_
    safetensors_badnet`` runs it); ``options`` replace or add ``--name value`` pairs."""
    from safetensors.torch import save_file

    model = tmp_path / "bad.safetensors"
    if not model.exists():
        save_file(_module().state_dict(), str(model))
    argv = ["predeploy", "--badnet", str(model), "--arch", "small_cnn",
            "--arch-kwargs", '{"width": 4}', "--dataset", "digits", *GRID,
            "--out", str(tmp_path / "out")]  # fmt: skip
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_predeploy_an_imported_safetensors_badnet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = import_argv(tmp_path)
    # width=4 is not the zoo default, so a plain --arch import must fail loudly ...
    plain = argv[: argv.index("--arch-kwargs")] + argv[argv.index("--arch-kwargs") + 2 :]
    assert main(plain) == EXIT_BAD_INPUT
    assert "do not fit architecture 'small_cnn'" in one_error_line(capsys)
    # ... and with its kwargs it runs, and is published to a store when one is named
    store = tmp_path / "store"
    assert main([*argv, "--store", str(store), "--deployment", "digits"]) == 0
    assert "digits v0001 (active)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["cells_trained"] == 1 and report["alpha"] == pytest.approx(1e-3)
    bundle = load_bundle(out / "bundle")
    assert bundle.manifest.nets["goodnet"].format == "zoo"
    models = ModelStore(store)
    assert models.versions("digits") == ["v0001"] and models.active("digits") == "v0001"
    assert models.manifest("digits", "v0001").files == bundle.manifest.files


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
    # the model file exists (the valid command of the imported-BadNet test): only data is missing
    argv = import_argv(tmp_path, dataset=str(tmp_path / "none.npz"))
    assert main(argv) == EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert "no such file" in line and "none.npz" in line, line
    argv = ["predeploy", "--badnet", str(tmp_path / "x.pt"), "--dataset", "digits",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    assert "--alpha0" in capsys.readouterr().err
    argv = ["predeploy", "--badnet", str(tmp_path / "x.pt"), "--alpha0", "1e-3", "--mean", "0",
            "--std", "1", "--theta", "0.5",
            "--dataset", "digits", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == EXIT_BAD_INPUT  # the file is missing: reported before the grid runs
    assert "x.pt" in one_error_line(capsys)


def test_stream_and_repair_give_clear_errors_for_wrong_bundles(
    deployment_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    for command in ("stream", "repair"):
        # the valid command of test_stream_and_repair_numbers_out_of_range_are_usage_errors,
        # with an attack spec, so that the bundle is the only thing wrong with it
        argv = [*valid_argv(command, deployment_files), "--attack-spec",
                str(deployment_files["attack"])]  # fmt: skip
        argv[argv.index("--bundle") + 1] = str(not_a_bundle)
        assert main(argv) == EXIT_BAD_INPUT, command
        line = one_error_line(capsys)
        assert "manifest" in line and str(not_a_bundle) in line, (command, line)
    assert not deployment_files["out"].exists()


def test_list_attacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "attacks"]) == 0
    names = capsys.readouterr().out.split()
    assert {"patch", "all-to-all", "tca", "wanet", "adaptive"} <= set(names)


# --- usage errors: exit 2 with one line naming what is wrong ---


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("theta", "3"),
        ("theta", "-0.1"),
        ("theta", "0"),
        ("theta", "1"),
        ("theta", "abc"),
        ("gammas", "0.1,1.5"),
        ("gammas", "-0.2"),
        ("gammas", ","),
        ("alpha_multiples", "1,0"),
        ("alpha_multiples", "-2"),
        ("alpha0", "0"),
        ("epochs", "0"),
        ("batch_size", "0"),
        ("std", "0"),
        ("validation_per_class", "0"),
        ("seed", "-1"),
        ("arch_kwargs", "{bad json"),
        ("arch_kwargs", "[4]"),
    ],
)
def test_predeploy_numbers_out_of_range_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    # the command is otherwise the valid one of test_predeploy_an_imported_safetensors_badnet
    assert main(import_argv(tmp_path, **{option: value})) == EXIT_USAGE
    line = one_error_line(capsys)
    assert f"argument --{option.replace('_', '-')}" in line and value.split(",")[-1] in line, line
    assert not (tmp_path / "out").exists()


def test_misspelt_arch_kwargs_name_the_allowed_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(import_argv(tmp_path, arch_kwargs='{"widht": 4}')) == EXIT_USAGE
    line = one_error_line(capsys)
    assert "'widht'" in line and "allowed: width" in line and "dropout" in line, line
    assert main(import_argv(tmp_path, arch_kwargs='{"width": 1000000000}')) == EXIT_USAGE
    assert "less than or equal to 512" in one_error_line(capsys)


def test_bad_thread_settings_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NNOC_THREADS", "abc")
    assert main(["list", "attacks"]) == EXIT_USAGE
    assert "NNOC_THREADS must be a positive integer" in one_error_line(capsys)
    monkeypatch.setenv("NNOC_THREADS", "0")
    assert main(["list", "attacks"]) == EXIT_USAGE
    assert "NNOC_THREADS" in one_error_line(capsys)
    monkeypatch.setenv("NNOC_THREADS", "1")
    assert main(["--threads", "0", "list", "attacks"]) == EXIT_USAGE
    assert "argument --threads" in one_error_line(capsys)
    assert main(["list", "attacks"]) == 0


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("stream", "--n", "0"),
        ("stream", "--poison-ratio", "2"),
        ("stream", "--poison-ratio", "-0.5"),
        ("repair", "--finetune-epochs", "0"),
        ("repair", "--epochs", "0"),
        ("repair", "--theta", "1.5"),
        ("repair", "--finetune-lr", "0"),
        ("repair", "--cyclegan-lr", "-1"),
        ("repair", "--time-budget", "0"),
        ("repair", "--domain-a-size", "0"),
        ("repair", "--affine-share", "2"),
        ("repair", "--distill-weight", "1.1"),
        ("repair", "--distill-temperature", "0"),
        ("repair", "--purify-min-share", "0"),
        ("repair", "--profile", "nope"),
        ("repair", "--deployment", "../escape"),
    ],
)
def test_stream_and_repair_numbers_out_of_range_are_usage_errors(
    deployment_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
    option: str,
    value: str,
) -> None:
    argv = valid_argv(command, deployment_files)
    argv += [option, value]
    assert main(argv) == EXIT_USAGE
    line = one_error_line(capsys)
    assert f"argument {option}" in line and value in line, line


# --- bad input: exit 4 with one line ---


@pytest.fixture
def deployment_files(tmp_path: Path) -> dict[str, Path]:
    """An untrained but well-formed digits deployment bundle, a quarantine and an attack spec."""
    from nnoculation.attacks import get_attack

    torch.manual_seed(0)
    nets = {
        role: Net(_module(), "zoo", DIGITS_SPEC, 10, "small_cnn", {"width": 4})
        for role in ("badnet", "goodnet")
    }
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 10
    write_bundle_dir(
        tmp_path / "predeploy" / "bundle",
        name="deployment",
        nets=nets,
        class_names=[str(i) for i in range(10)],
        tensors={
            VALIDATION_GROUP: {
                "retrain_images": images,
                "retrain_labels": labels,
                "holdout_images": images,
                "holdout_labels": labels,
            }
        },
        metrics={"baseline_holdout_ca": 0.1},
        provenance={"predeploy": {"alpha0": 1e-3, "optimizer": "adam", "theta": 0.03}},
    )
    np.savez(tmp_path / "q.npz", images=images.numpy())
    spec = get_attack("patch", 10, (1, 8, 8))
    (tmp_path / "attack.json").write_text(json.dumps(spec.to_dict()))
    return {
        "deployment": tmp_path / "predeploy",
        "quarantine": tmp_path / "q.npz",
        "attack": tmp_path / "attack.json",
        "out": tmp_path / "out",
    }


def valid_argv(command: str, files: dict[str, Path]) -> list[str]:
    if command == "stream":
        return ["stream", "--bundle", str(files["deployment"]), "--attack-spec",
                str(files["attack"]), "--out", str(files["out"] / "q.npz")]  # fmt: skip
    return ["repair", "--bundle", str(files["deployment"]), "--quarantine",
            str(files["quarantine"]), "--profile", "mean-diff", "--finetune-epochs", "1",
            "--out", str(files["out"])]  # fmt: skip


def test_a_deployment_bundle_is_no_badnet(
    deployment_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for path in (deployment_files["deployment"], deployment_files["deployment"] / "bundle"):
        argv = ["predeploy", "--badnet", str(path), "--out", str(deployment_files["out"])]
        assert main(argv) == EXIT_BAD_INPUT
        line = one_error_line(capsys)
        assert "is a deployment bundle" in line and "nnoculation attack" in line, line
        assert "nnoculation repair --bundle" in line


def test_missing_or_broken_repair_inputs(
    deployment_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = valid_argv("repair", deployment_files)
    missing = argv.copy()
    missing[missing.index("--quarantine") + 1] = str(deployment_files["out"] / "none.npz")
    assert main(missing) == EXIT_BAD_INPUT
    assert "no such quarantine" in one_error_line(capsys)
    deployment_files["attack"].write_text("{not json")
    assert main([*argv, "--attack-spec", str(deployment_files["attack"])]) == EXIT_BAD_INPUT
    assert "is not an attack spec" in one_error_line(capsys)
    deployment_files["attack"].write_text('{"name": "x"}')
    assert main([*argv, "--attack-spec", str(deployment_files["attack"])]) == EXIT_BAD_INPUT
    assert "is not an attack spec" in one_error_line(capsys)
    assert not (deployment_files["out"] / "bundle").exists()


def test_repair_needs_a_bundle_or_a_store(
    deployment_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = valid_argv("repair", deployment_files)
    no_bundle = argv[: argv.index("--bundle")] + argv[argv.index("--bundle") + 2 :]
    assert main(no_bundle) == EXIT_USAGE
    assert "--store and --deployment" in one_error_line(capsys)
    assert main([*argv, "--store", str(deployment_files["out"])]) == EXIT_USAGE
    assert "--store and --deployment go together" in one_error_line(capsys)
    both = [*argv, "--store", str(deployment_files["out"]), "--deployment", "d"]
    assert main(both) == EXIT_USAGE
    assert "exclude each other" in one_error_line(capsys)
    assert main([*argv, "--no-activate"]) == EXIT_USAGE
    assert "--no-activate is for --store" in one_error_line(capsys)


# --- store commands ---


def test_store_commands(
    deployment_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", str(tmp_path / "store"), "--deployment", "digits"]
    source = str(deployment_files["deployment"])
    assert main(["store", "list", *store]) == EXIT_BAD_INPUT
    assert "unknown deployment 'digits'" in one_error_line(capsys)
    assert main(["store", "import", *store, source]) == 0
    assert "digits v0001 (not activated)" in capsys.readouterr().out
    assert main(["store", "import", *store, source, "--activate"]) == 0
    assert "digits v0002 (active)" in capsys.readouterr().out
    assert main(["store", "list", *store]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].startswith("  v0001 ") and rows[2].startswith("* v0002 ")
    assert main(["store", "activate", *store, "v0001"]) == 0
    assert "v0001 is active" in capsys.readouterr().out
    assert ModelStore(tmp_path / "store").active("digits") == "v0001"
    assert main(["store", "rollback", *store, "v0002"]) == 0
    assert "v0002 is active" in capsys.readouterr().out
    assert main(["store", "rollback", *store]) == 0  # imports have no parent: the one before
    assert "v0001 is active" in capsys.readouterr().out
    assert main(["store", "rollback", *store]) == EXIT_BAD_INPUT
    assert "nothing to roll back to" in one_error_line(capsys)
    assert main(["store", "activate", *store, "v0009"]) == EXIT_BAD_INPUT
    assert "no version 'v0009'" in one_error_line(capsys)
    assert main(["store", "activate", *store, "9"]) == EXIT_USAGE
    assert "invalid version id" in one_error_line(capsys)
    tampered = tmp_path / "tampered"
    shutil.copytree(deployment_files["deployment"] / "bundle", tampered)
    (tampered / "badnet.safetensors").write_bytes(b"changed")
    assert main(["store", "import", *store, str(tampered)]) == EXIT_BAD_INPUT
    assert "sha256" in one_error_line(capsys)


def test_store_cleanup_removes_old_leftovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    stale, fresh = root / "digits" / ".tmp-crashed", root / "digits" / ".tmp-running"
    stale.mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (0, 0))  # a publish that crashed long ago
    assert main(["store", "cleanup", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {stale}" in out and "1 removed from" in out
    assert not stale.exists() and fresh.exists()  # a younger one may be a publish running
    assert main(["store", "cleanup", "--store", str(root), "--older-than", "0"]) == 0
    assert not fresh.exists()
    assert main(["store", "cleanup", "--store", str(root), "--deployment", "other"]) == (
        EXIT_BAD_INPUT
    )
    assert "unknown deployment 'other'" in one_error_line(capsys)
    assert main(["store", "cleanup", "--store", str(root), "--older-than", "-1"]) == EXIT_USAGE
    assert "non-negative" in one_error_line(capsys)
