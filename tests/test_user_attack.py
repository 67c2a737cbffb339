"""A user's own attack (a trigger not in the catalog) saved as a *triggered set* ``.npz`` is
measured wherever an attack spec is: ``evaluate``, ``predeploy --attack-spec``, ``stream`` and
``repair --attack-spec``, with its ASR computed as for catalog attacks (over the images whose
true label differs from the target), and malformed files give one clear line and exit code 4.

Everything runs on scikit-learn digits (8x8), with a tiny BadNet whose trigger is a blended
checkerboard that no catalog attack has."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.bundle import load_bundle
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from nnoculation import pipeline
from nnoculation.attacks import get_attack
from nnoculation.attacks.triggered_set import (
    TriggeredSetError,
    load_triggered_set,
    save_triggered_set,
)
from nnoculation.badnets import load_splits
from nnoculation.bundle_io import write_bundle_dir
from nnoculation.cli import EXIT_BAD_INPUT, main
from nnoculation.data.imageset import ImageSet
from nnoculation.data.splits import Splits
from nnoculation.metrics import EVAL_SEED, clean_accuracy, evaluate
from nnoculation.pipeline import VALIDATION_GROUP
from nnoculation.recipes import default_recipe
from nnoculation.stream import StreamConfig, make_stream
from nnoculation.training import TrainConfig, train

SPEC = InputSpec(1, 8, 8)  # digits, as --dataset digits gives them (mean 0, std 1)
CLASSES = 10
TARGET = 3
NAME = "my-blend"
WIDTH = 8


def blend(images: torch.Tensor, share: float = 0.45) -> torch.Tensor:
    """The user's trigger: a checkerboard at full brightness blended in (not in the catalog)."""
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 255).to(torch.float32)
    mixed = (1 - share) * images.float() + share * board
    return mixed.round().clamp(0, 255).to(torch.uint8)


def _net() -> Net:
    module = build_classifier("small_cnn", SPEC, CLASSES, width=WIDTH)
    return Net(module, "zoo", SPEC, CLASSES, "small_cnn", {"width": WIDTH})


@dataclass(frozen=True)
class World:
    splits: Splits
    badnet: Net
    goodnet: Net
    deployment: Path  # bundle folder (BadNet + a clean GoodNet, digits recipe recorded)
    badnet_file: Path  # the BadNet alone, as a user's .safetensors
    triggered: Path  # triggered set of the test pool


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("user_attack")
    recipe = default_recipe("digits")
    splits = load_splits(recipe)
    attacker = splits.attacker
    g = torch.Generator().manual_seed(0)
    eligible = torch.nonzero(attacker.labels != TARGET).flatten()
    chosen = eligible[torch.randperm(eligible.numel(), generator=g)[: len(attacker) // 5]]
    images, labels = attacker.images.clone(), attacker.labels.clone()
    images[chosen] = blend(images[chosen])
    labels[chosen] = TARGET
    cfg = TrainConfig(epochs=15, batch_size=32, lr=3e-3, seed=0)
    torch.manual_seed(0)
    badnet = _net()
    train(badnet, ImageSet(images, labels, attacker.class_names), cfg, progress=False)
    goodnet = _net()  # stands in for the GoodNet: never saw the trigger
    train(goodnet, attacker, cfg, progress=False)
    write_bundle_dir(
        root / "bundle",
        name="deployment",
        nets={"badnet": badnet, "goodnet": goodnet},
        class_names=splits.retrain.class_names,
        tensors={
            VALIDATION_GROUP: {
                "retrain_images": splits.retrain.images,
                "retrain_labels": splits.retrain.labels,
                "holdout_images": splits.holdout.images,
                "holdout_labels": splits.holdout.labels,
            }
        },
        metrics={"baseline_holdout_ca": clean_accuracy(badnet, splits.holdout)},
        provenance={
            "predeploy": {"alpha0": cfg.lr, "optimizer": "adam", "theta": 0.5},
            "source": {"recipe": recipe.to_dict()},
        },
    )
    save_file(badnet.module.state_dict(), str(root / "bad.safetensors"))
    test = splits.test
    path = save_triggered_set(root / "mine.npz", blend(test.images), test.labels, TARGET, NAME)
    return World(splits, badnet, goodnet, root / "bundle", root / "bad.safetensors", path)


def _rate(net: Net, images: torch.Tensor, targets: torch.Tensor) -> float:
    return float((net.predict(images) == targets).float().mean())


def test_the_file_holds_channels_last_images_and_reads_back(world: World) -> None:
    with np.load(world.triggered) as data:
        assert data["images"].shape == (len(world.splits.test), 8, 8, 1)
        assert data["images"].dtype == np.uint8 and data["target"].shape == ()
    loaded = load_triggered_set(world.triggered)
    assert loaded.name == NAME
    assert torch.equal(loaded.images, blend(world.splits.test.images))
    assert torch.equal(loaded.labels, world.splits.test.labels)
    assert bool((loaded.targets == TARGET).all())


def test_asr_excludes_images_whose_true_label_is_the_target(world: World) -> None:
    test = world.splits.test
    attack = load_triggered_set(world.triggered)
    keep = test.labels != TARGET
    assert 0 < int((~keep).sum()) < len(test)  # the file holds target-class images too
    triggered = blend(test.images)
    targets = torch.full_like(test.labels, TARGET)
    for net in (world.badnet, world.goodnet):
        ev = evaluate(net, test, attack)
        assert ev.ca == clean_accuracy(net, test) and ev.controls == {}
        assert ev.asr == {NAME: _rate(net, triggered[keep], targets[keep])}
    bad = evaluate(world.badnet, test, attack).asr[NAME]
    good = evaluate(world.goodnet, test, attack).asr[NAME]
    assert bad > 0.8 and good < 0.2, (bad, good)  # the backdoor is real and is measured
    # Counting the target-class images (which a good net labels with the target) would raise
    # the GoodNet's rate: the exclusion is what makes the two numbers differ.
    assert _rate(world.goodnet, triggered, targets) > good + 0.05


@pytest.mark.parametrize("catalog", ["patch", "all-to-all"])
def test_a_catalog_attack_saved_as_a_triggered_set_gives_the_same_asr(
    world: World, catalog: str, tmp_path: Path
) -> None:
    test = world.splits.test
    spec = get_attack(catalog, CLASSES, SPEC.shape)
    (trigger,) = spec.triggers
    images, targets, _ = spec.triggered(test, trigger, EVAL_SEED)
    target: int | torch.Tensor = targets if catalog == "all-to-all" else int(targets[0])
    path = save_triggered_set(tmp_path / "t.npz", images, test.labels, target, trigger.name)
    for net in (world.badnet, world.goodnet):
        assert evaluate(net, test, load_triggered_set(path)).asr == evaluate(net, test, spec).asr


def test_predeploy_measures_a_triggered_set(world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["predeploy", "--badnet", str(world.badnet_file), "--arch", "small_cnn",
            "--arch-kwargs", json.dumps({"width": WIDTH}), "--dataset", "digits",
            "--alpha0", "1e-3", "--mean", "0", "--std", "1", "--alpha-multiples", "1",
            "--gammas", "0.3", "--epochs", "1", "--theta", "0.99",
            "--attack-spec", str(world.triggered), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["attack"] == NAME and report["floor"] is None
    attack = load_triggered_set(world.triggered)
    expected = evaluate(world.badnet, world.splits.test, attack)
    assert report["badnet_test"]["asr"] == pytest.approx(expected.asr)
    assert report["badnet_test"]["ca"] == pytest.approx(expected.ca)
    goodnet = load_bundle(out / "bundle").net("goodnet")
    assert report["goodnet_test"]["asr"] == pytest.approx(
        evaluate(goodnet, world.splits.test, attack).asr
    )


def test_stream_quarantines_a_users_trigger(world: World, tmp_path: Path) -> None:
    q = tmp_path / "q.npz"
    argv = ["stream", "--bundle", str(world.deployment), "--attack-spec", str(world.triggered),
            "--poison-ratio", "0.3", "--n", "30", "--seed", "4", "--out", str(q)]  # fmt: skip
    assert main(argv) == 0
    attack = load_triggered_set(world.triggered)
    usable = attack.evaluation_set().images
    with np.load(q) as data:
        images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
        poisoned = torch.from_numpy(data["eval_poisoned"])
    assert len(images) == 30
    assert poisoned.float().mean() > 0.7, poisoned  # the GoodNet parts ways on the trigger
    flat = usable.flatten(1)
    for image, flag in zip(images, poisoned, strict=True):
        from_set = bool((flat == image.flatten()).all(dim=1).any())
        assert from_set == bool(flag)  # poisoned inputs are the file's images, never others
    stream, flags = make_stream(world.splits.stream, attack, StreamConfig(0.3, seed=4))
    assert abs(flags.float().mean().item() - 0.3) < 0.1
    assert all(bool((flat == image.flatten()).all(dim=1).any()) for image in stream[flags]), (
        "a poisoned stream input is one of the triggered images (true label != target)"
    )


def test_repair_measures_a_triggered_set(world: World, tmp_path: Path) -> None:
    q = tmp_path / "q.npz"
    np.savez(q, images=blend(world.splits.stream.images[:40]).permute(0, 2, 3, 1).numpy())
    out = tmp_path / "repair"
    argv = ["repair", "--bundle", str(world.deployment), "--quarantine", str(q),
            "--profile", "mean-diff", "--finetune-epochs", "1", "--theta", "0.99",
            "--attack-spec", str(world.triggered), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "repair_report.json").read_text())
    attack = load_triggered_set(world.triggered)
    before = report["evaluation"]["before"]["badnet"]["asr"]
    assert before == pytest.approx(evaluate(world.badnet, world.splits.test, attack).asr)
    repaired = load_bundle(out / "bundle").net("badnet")
    after = report["evaluation"]["after"]["badnet"]["asr"]
    assert after == pytest.approx(evaluate(repaired, world.splits.test, attack).asr)


def _write(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _malformed(world: World, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    with np.load(world.triggered) as data:
        good = {key: data[key] for key in data.files}
    n = len(good["labels"])
    nchw = good["images"].transpose(0, 3, 1, 2)
    cases: dict[str, tuple[dict[str, object], str]] = {
        "no target": ({k: v for k, v in good.items() if k != "target"}, "missing ['target']"),
        "channels first": ({**good, "images": nchw}, "stores them channels last"),
        "float images": ({**good, "images": good["images"].astype(np.float32)}, "uint8"),
        "short labels": ({**good, "labels": good["labels"][:-1]}, f"[N] = [{n}]"),
        "float labels": ({**good, "labels": good["labels"] * 1.0}, "must hold integers"),
        "target per pair": ({**good, "target": np.zeros((n, 2), np.int64)}, "one per image"),
        "target absent class": ({**good, "target": np.int64(10)}, "among 10 classes"),
        "nothing to measure": (
            {**good, "target": good["labels"]},
            "true label equals its target",
        ),
        "typo": ({**good, "targets": good["target"]}, "unknown arrays ['targets']"),
        "quarantine": (
            {"images": good["images"], "badnet_labels": good["labels"]},
            "looks like a quarantine",
        ),
    }
    out = {}
    for i, (case, (arrays, message)) in enumerate(cases.items()):
        out[case] = (_write(tmp_path / f"bad{i}.npz", **arrays), message)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    out["not npz"] = (tmp_path / "junk.npz", "not a readable .npz")
    out["missing"] = (tmp_path / "none.npz", "no such triggered set")
    return out


def test_malformed_triggered_sets_are_one_line_bad_input(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cases = _malformed(world, tmp_path)
    for case, (path, message) in cases.items():
        q = tmp_path / "q.npz"
        argv = ["stream", "--bundle", str(world.deployment), "--attack-spec", str(path),
                "--out", str(q)]  # fmt: skip
        assert main(argv) == EXIT_BAD_INPUT, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(path) in err[0], (case, err)
        assert not q.exists(), case

    # predeploy refuses it before the search
    def no_search(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the search ran before the triggered set was checked")

    monkeypatch.setattr(pipeline, "run_predeploy", no_search)
    path, message = cases["channels first"]
    out = tmp_path / "out"
    argv = ["predeploy", "--badnet", str(world.badnet_file), "--arch", "small_cnn",
            "--arch-kwargs", json.dumps({"width": WIDTH}), "--dataset", "digits",
            "--alpha0", "1e-3", "--mean", "0", "--std", "1",
            "--attack-spec", str(path), "--out", str(out)]  # fmt: skip
    assert main(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_triggered_set_has_one_trigger_name(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["stream", "--bundle", str(world.deployment), "--attack-spec", str(world.triggered),
            "--triggers", "patch", "--out", str(tmp_path / "q.npz")]  # fmt: skip
    assert main(argv) == 2
    assert f"has one trigger, {NAME!r}" in capsys.readouterr().err
    with pytest.raises(TriggeredSetError, match="missing"):  # the library's own error
        load_triggered_set(_malformed(world, tmp_path)["no target"][0])
