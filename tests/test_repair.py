"""The repair engine: treatment labels, the validation gate, publishing a new version, and a
CycleGAN repair that is killed mid-training and resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import Manifest, load_bundle, verify_bundle, write_bundle
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from models.store import ModelStore
from nnoculation.cli import EXIT_BAD_INPUT, EXIT_BUSY, EXIT_GATE_FAILED, main
from nnoculation.metrics import evaluate
from nnoculation.repair.engine import (
    TRIGGER_MODEL_GROUP,
    RepairConfig,
    bundle_validation,
    repair,
    write_repaired_bundle,
)
from nnoculation.repair.quarantine import QuarantineError, load_quarantine
from nnoculation.repair.reverse import MEAN_DIFF, fit_poison, load_poison
from nnoculation.repair.treatment import make_treatment
from tests.conftest import synthetic_set
from tests.deployment_fixtures import make_deployment, triggered

QUARANTINE_SIZE = 60


def _quarantine(attack, path: Path | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    images = triggered(attack, synthetic_set(QUARANTINE_SIZE, seed=21).images)
    if path is not None:
        np.savez(path, images=images.permute(0, 2, 3, 1).numpy())
    return images


def test_treatment_is_poisoned_validation_with_true_labels() -> None:
    clean = synthetic_set(40, seed=1)
    poison = fit_poison(MEAN_DIFF, clean.images, clean.images.flip(-1))
    treatment = make_treatment(poison, clean)
    assert torch.equal(treatment.labels, clean.labels)
    assert torch.equal(treatment.images, poison.apply(clean.images))
    assert not torch.equal(treatment.images, clean.images)


def test_fit_poison_overrides_the_profiles_learning_rate() -> None:
    clean = synthetic_set(16, seed=1).images
    poison = fit_poison("test", clean, clean.flip(-1), lr=1e-3, progress=False)
    report = poison.report()
    assert report["profile"]["lr"] == 1e-3
    assert report["losses"][0]["lr"] == pytest.approx(1e-3)


def test_repair_unlearns_a_fixed_patch_and_publishes_a_child_version(
    tiny_net: Net, tmp_path: Path
) -> None:
    path, attack, test = make_deployment(tiny_net, tmp_path)
    bundle = load_bundle(path)
    before = evaluate(bundle.net("badnet"), test, attack).asr["patch"]
    cfg = RepairConfig(profile=MEAN_DIFF, finetune_epochs=4, theta=0.1)
    outcome = repair(bundle, _quarantine(attack), cfg, test=test, attack=attack, progress=False)
    assert outcome.passed_gate, outcome.reason
    after = outcome.evaluation["after"]["badnet"].asr["patch"]
    assert before > 0.5 and after < before / 2, (before, after)
    manifest = write_repaired_bundle(outcome, bundle, tmp_path / "v2", "v0002")
    assert manifest.parent == "v0001" and manifest.version == "v0002"
    verify_bundle(tmp_path / "v2")
    child = load_bundle(tmp_path / "v2")
    assert "delta" in child.tensors(TRIGGER_MODEL_GROUP)
    assert child.manifest.provenance["repairs"][0]["parent"] == "v0001"
    # The child holds the repaired nets, each in its own role.
    x = test.images[:16]
    for role in ("badnet", "goodnet"):
        assert torch.equal(child.net(role).scores(x), getattr(outcome, role).scores(x)), role
    assert not torch.equal(outcome.badnet.scores(x), outcome.goodnet.scores(x))
    assert (tmp_path / "v2" / "repair_samples.png").read_bytes()[:4] == b"\x89PNG"
    stored = load_poison(
        child.manifest.provenance["repairs"][0]["trigger_model"],
        child.tensors(TRIGGER_MODEL_GROUP),
        channels=1,
    )
    clean = test.images[:8]
    assert torch.equal(stored.apply(clean), outcome.poison.apply(clean))


def test_trigger_model_is_fit_to_the_purified_quarantine(tiny_net: Net, tmp_path: Path) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    bundle = load_bundle(path)
    clean = synthetic_set(QUARANTINE_SIZE // 3, seed=33).images  # clean disagreements
    mixed = torch.cat([_quarantine(attack), clean])
    cfg = RepairConfig(profile=MEAN_DIFF, theta=0.99)
    outcome = repair(bundle, mixed, cfg, progress=False)
    target = int(attack.triggers[0].target.targets(torch.zeros(1, dtype=torch.long), 4)[0])
    labels = bundle.net("badnet").predict(mixed)
    purified = outcome.purified
    assert purified.applied and target in purified.target_labels
    assert torch.equal(purified.kept, torch.isin(labels, torch.tensor(purified.target_labels)))
    assert 0 < int(purified.kept[QUARANTINE_SIZE:].sum()) < len(clean)  # most clean ones go
    val = bundle_validation(bundle)
    pick = torch.randperm(len(val.retrain), generator=torch.Generator().manual_seed(cfg.seed))
    domain_a = val.retrain.images[pick[: cfg.domain_a_size]].float()
    expected = mixed[purified.kept].float().mean(0) - domain_a.mean(0)
    assert torch.allclose(outcome.poison.state()["delta"], expected)
    assert outcome.report()["purify"]["kept"] == int(purified.kept.sum())


def test_a_given_trigger_model_is_used_instead_of_a_fitted_one(
    tiny_net: Net, tmp_path: Path
) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    bundle = load_bundle(path)
    quarantine = _quarantine(attack)
    known = fit_poison(MEAN_DIFF, synthetic_set(20, seed=5).images, quarantine)
    cfg = RepairConfig(profile="paper", theta=0.99)  # a fitted paper CycleGAN would take minutes
    outcome = repair(bundle, quarantine, cfg, progress=False, poison=known)
    assert outcome.poison is known
    assert outcome.report()["trigger_model"]["kind"] == MEAN_DIFF


def test_gate_refuses_a_repair_that_drops_ca(tiny_net: Net, tmp_path: Path) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    q = tmp_path / "q.npz"
    _quarantine(attack, q)
    out = tmp_path / "out"
    argv = ["repair", "--bundle", str(path), "--quarantine", str(q), "--profile", MEAN_DIFF,
            "--finetune-lr", "5.0", "--theta", "0.02", "--out", str(out)]  # fmt: skip
    assert main(argv) == EXIT_GATE_FAILED
    assert not (out / "bundle").exists(), "a gated repair must publish nothing"
    report = json.loads((out / "repair_report.json").read_text())
    assert report["passed_gate"] is False and "below the baseline" in report["reason"]
    bundle = load_bundle(path)
    with pytest.raises(ValueError, match="failed the gate"):
        outcome = repair(bundle, _quarantine(attack), RepairConfig(profile=MEAN_DIFF,
                         finetune_lr=5.0, theta=0.02), progress=False)  # fmt: skip
        write_repaired_bundle(outcome, bundle, tmp_path / "never", "v0002")
    assert not (tmp_path / "never").exists()


def test_quarantine_of_the_wrong_shape_is_refused(
    tiny_net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, _ = make_deployment(tiny_net, tmp_path)
    np.savez(tmp_path / "q.npz", images=np.zeros((4, 28, 28), dtype=np.uint8))
    bundle = load_bundle(path)
    with pytest.raises(QuarantineError, match="bundle's nets take"):
        load_quarantine(tmp_path / "q.npz", bundle.spec)
    argv = ["repair", "--bundle", str(path), "--quarantine", str(tmp_path / "q.npz"),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()  # exit 4 for this reason, not for another bad input
    assert len(err.splitlines()) == 1 and "bundle's nets take [1, 12, 12]" in err, err
    assert not (tmp_path / "o").exists()


def test_killed_repair_resumes_from_its_checkpoint(tiny_net: Net, tmp_path: Path) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    q = tmp_path / "q.npz"
    _quarantine(attack, q)
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "nnoculation.cli", "--threads", "1", "repair",
           "--bundle", str(path), "--quarantine", str(q), "--profile", "test", "--epochs", "12",
           "--checkpoint-dir", str(ckpt), "--theta", "0.5",
           "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (ckpt / "cyclegan.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "bundle").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "repair_report.json").read_text())
    resumed = report["trigger_model"]["resumed_from_epoch"]
    assert resumed is not None and 1 <= resumed < 12
    assert report["trigger_model"]["epochs_done"] == 12
    verify_bundle(tmp_path / "out" / "bundle")


def test_repair_in_a_store_publishes_a_child_of_the_active_version(
    tiny_net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    q = tmp_path / "q.npz"
    _quarantine(attack, q)
    store = ModelStore(tmp_path / "store")
    store.publish("digits", lambda d, v: write(d, v), None)  # an unrelated first version
    assert store.import_bundle("digits", path, activate=True) == "v0002"
    target = ["--store", str(store.root), "--deployment", "digits"]
    argv = ["repair", *target, "--quarantine", str(q), "--profile", MEAN_DIFF,
            "--finetune-epochs", "2", "--theta", "0.5"]  # fmt: skip
    assert main(argv) == 0
    assert "digits v0003 (parent v0002) published, active" in capsys.readouterr().out
    assert store.active("digits") == "v0003"
    child = store.load("digits")
    assert child.manifest.parent == "v0002"
    assert child.manifest.provenance["repairs"][-1]["parent"] == "v0002"
    out = tmp_path / "out"
    assert main([*argv, "--no-activate", "--out", str(out)]) == 0
    assert store.versions("digits")[-1] == "v0004" and store.active("digits") == "v0003"
    assert store.manifest("digits", "v0004").parent == "v0003"  # the active one was repaired
    assert (out / "repair_report.json").exists() and not (out / "bundle").exists()
    with store.repair_lock("digits"):
        assert main(argv) == EXIT_BUSY
    assert "already running" in capsys.readouterr().err
    gated = [*argv[:-2], "--finetune-lr", "5.0", "--theta", "0.02"]
    assert main(gated) == EXIT_GATE_FAILED
    assert "kept as rejected candidate digits v0005" in capsys.readouterr().err
    assert store.versions("digits") == ["v0001", "v0002", "v0003", "v0004", "v0005"]
    assert store.active("digits") == "v0003"
    (tmp_path / "store" / "digits" / "ACTIVE").unlink()
    assert main(argv) == EXIT_BAD_INPUT
    assert "no active version to repair" in capsys.readouterr().err


def write(directory: Path, version: str) -> Manifest:
    """A minimal bundle that is no deployment (one net, no validation set)."""
    net = Net(
        build_classifier("small_cnn", InputSpec(1, 12, 12), 4, width=2), "zoo",
        InputSpec(1, 12, 12), 4, "small_cnn", {"width": 2},
    )  # fmt: skip
    return write_bundle(
        directory, name="other", version=version, parent=None, spec=net.spec,
        class_names=["a", "b", "c", "d"], nets={"badnet": net},
    )  # fmt: skip


def test_a_torchscript_deployment_is_repaired_and_stays_torchscript(tmp_path: Path) -> None:
    """TorchScript BadNet -> predeploy -> repair from the CLI: both nets of the repaired child
    version are TorchScript and, reloaded, answer otherwise than the parent's (retrained)."""
    spec = InputSpec(1, 8, 8)  # scikit-learn digits, as --dataset digits gives them
    torch.manual_seed(0)
    torch.jit.save(
        torch.jit.script(build_classifier("small_cnn", spec, 10, width=4)),
        str(tmp_path / "bad.pt"),
    )
    deployment = tmp_path / "predeploy"
    argv = ["predeploy", "--badnet", str(tmp_path / "bad.pt"), "--dataset", "digits",
            "--alpha0", "1e-3", "--mean", "0", "--std", "1", "--alpha-multiples", "1",
            "--gammas", "0.3", "--epochs", "1", "--theta", "0.99",
            "--out", str(deployment)]  # fmt: skip
    assert main(argv) == 0
    parent = load_bundle(deployment / "bundle")
    assert {parent.manifest.nets[r].format for r in ("badnet", "goodnet")} == {"torchscript"}
    g = torch.Generator().manual_seed(1)
    quarantine = torch.randint(0, 256, (40, *spec.shape), dtype=torch.uint8, generator=g)
    quarantine[:, :, -3:, -3:] = 255  # a corner patch stands in for the attacker's trigger
    q = tmp_path / "q.npz"
    np.savez(q, images=quarantine.permute(0, 2, 3, 1).numpy())
    out = tmp_path / "repair"
    argv = ["repair", "--bundle", str(deployment), "--quarantine", str(q),
            "--profile", MEAN_DIFF, "--finetune-epochs", "1", "--theta", "0.99",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    verify_bundle(out / "bundle")
    child = load_bundle(out / "bundle")
    assert child.manifest.parent == parent.manifest.version
    assert {child.manifest.nets[r].format for r in ("badnet", "goodnet")} == {"torchscript"}
    probe = torch.randint(0, 256, (16, *spec.shape), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        for role in ("badnet", "goodnet"):
            before, after = parent.net(role).logits(probe), child.net(role).logits(probe)
            assert not torch.allclose(before, after), f"the {role} was not retrained"
    report = json.loads((out / "repair_report.json").read_text())
    assert report["passed_gate"] is True
