"""Validation data the BadNet never saw (issue 12, item 2): the defender's validation set drawn
from the test split with the stream and test pools shrinking and never overlapping it, the
source recorded in the reports and the provenance, and the warning when a BadNet looks as if
it memorised its validation images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from nnoculation.badnets import load_splits
from nnoculation.cli import EXIT_BAD_INPUT, EXIT_USAGE, main
from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import DataSource, load_digits, load_fashion_mnist
from nnoculation.data.splits import PARTS, SplitConfig, Splits, make_splits
from nnoculation.pipeline import MEMORISATION_MIN_GAP, MEMORISATION_Z, check_validation
from nnoculation.recipes import FASHION_MNIST_RECIPE, Recipe
from nnoculation.runtime import seeded_rng
from nnoculation.training import TrainConfig, train
from tests.conftest import NUM_CLASSES, SIDE, synthetic_set

CLASSES = ("a", "b", "c", "d")


def hashes(images: torch.Tensor) -> list[str]:
    """One SHA-256 per image, of its bytes."""
    return [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images]


def unique_source(n_train: int, n_test: int, side: int = 6) -> DataSource:
    """Random (hence all different) images, 4 balanced classes, a test split of its own."""
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n_train + n_test, 1, side, side), generator=g)
    labels = torch.arange(n_train + n_test) % len(CLASSES)
    images = images.to(torch.uint8)
    return DataSource(
        "toy",
        ImageSet(images[:n_train], labels[:n_train], CLASSES),
        ImageSet(images[n_train:], labels[n_train:], CLASSES),
    )


def assert_disjoint_and_traceable(source: DataSource, sp: Splits) -> None:
    """Every part's images are those its ``origin`` indices name, and no image (by content)
    or index (within its split) is in two parts."""
    assert source.test is not None
    seen: dict[str, set[int]] = {"train": set(), "test": set()}
    for name in PARTS:
        where, idx = sp.origin[name]
        base = source.train if where == "train" else source.test
        part = getattr(sp, name)
        assert torch.equal(part.images, base.images[idx]) and torch.equal(
            part.labels, base.labels[idx]
        )
        indices = set(idx.tolist())
        assert len(indices) == len(idx) and not indices & seen[where], name
        seen[where] |= indices
    by_content = [set(hashes(getattr(sp, name).images)) for name in PARTS]
    assert sum(len(h) for h in by_content) == len(set().union(*by_content))


def test_test_source_draws_validation_from_the_test_split_and_shrinks_the_pools() -> None:
    source = unique_source(n_train=1000, n_test=600)
    assert source.test is not None
    cfg = SplitConfig(validation_per_class=50, holdout_per_class=10, validation_source="test")
    sp = make_splits(source, cfg)
    assert sp.validation_source == "test"
    # 200 validation images leave 400 of the 600 test images, half to each pool; the attacker
    # (a BadNet trained on the publisher's training split) keeps all of it
    assert sp.sizes() == {
        "attacker": 1000,
        "retrain": 160,
        "holdout": 40,
        "stream": 200,
        "test": 200,
    }
    assert sp.retrain.per_class_counts() == [40] * 4 and sp.holdout.per_class_counts() == [10] * 4
    assert {sp.origin[p][0] for p in ("retrain", "holdout", "stream", "test")} == {"test"}
    assert_disjoint_and_traceable(source, sp)
    test_split, train_split = set(hashes(source.test.images)), set(hashes(source.train.images))
    validation = set(hashes(sp.validation.images))
    assert validation <= test_split and not validation & train_split
    pools = hashes(sp.validation.images) + hashes(sp.stream.images) + hashes(sp.test.images)
    assert sorted(pools) == sorted(test_split)  # the test split, each image in one part
    assert hashes(sp.attacker.images) == hashes(source.train.images)
    # seeded: the same config gives the same parts, another seed other ones
    again = make_splits(source, cfg)
    assert all(torch.equal(getattr(again, p).images, getattr(sp, p).images) for p in PARTS)
    other = make_splits(source, SplitConfig(50, 10, seed=1, validation_source="test"))
    assert not torch.equal(other.holdout.images, sp.holdout.images)


def test_train_source_stays_the_default_and_leaves_recipes_unchanged() -> None:
    source = unique_source(n_train=1000, n_test=200)
    cfg = SplitConfig(validation_per_class=50, holdout_per_class=10)
    sp = make_splits(source, cfg)
    assert cfg.validation_source == sp.validation_source == "train"
    assert sp.sizes() == {
        "attacker": 800,
        "retrain": 160,
        "holdout": 40,
        "stream": 100,
        "test": 100,
    }
    assert {sp.origin[p][0] for p in ("attacker", "retrain", "holdout")} == {"train"}
    assert_disjoint_and_traceable(source, sp)
    # The default is not written into recipes, so recipes (and the cache keys and provenance
    # of BadNets made before the option existed) are the same; "test" is, and round-trips.
    assert "validation_source" not in FASHION_MNIST_RECIPE.to_dict()["splits"]
    test_recipe = FASHION_MNIST_RECIPE.with_validation_source("test")
    assert test_recipe.to_dict()["splits"]["validation_source"] == "test"
    assert Recipe.from_dict(test_recipe.to_dict()) == test_recipe
    assert Recipe.from_dict(FASHION_MNIST_RECIPE.to_dict()).splits.validation_source == "train"


def test_fashion_mnist_pools_under_each_source() -> None:
    source = load_fashion_mnist()
    assert source.test is not None
    train_split, test_split = set(hashes(source.train.images)), set(hashes(source.test.images))
    for where, sizes in (
        (
            "train",
            {"attacker": 55000, "retrain": 4000, "holdout": 1000, "stream": 5000, "test": 5000},
        ),
        (
            "test",
            {"attacker": 60000, "retrain": 4000, "holdout": 1000, "stream": 2500, "test": 2500},
        ),
    ):
        recipe = FASHION_MNIST_RECIPE.with_validation_source(where)  # type: ignore[arg-type]
        sp = load_splits(recipe)
        assert sp.sizes() == sizes, where
        assert sp.validation.per_class_counts() == [500] * 10
        assert_disjoint_and_traceable(source, sp)
        validation = set(hashes(sp.validation.images))
        assert validation <= (test_split if where == "test" else train_split)
        for pool in (sp.stream, sp.test):
            assert set(hashes(pool.images)) <= test_split
            assert not set(hashes(pool.images)) & validation


def test_test_source_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="test split of its own"):
        make_splits(load_digits(), SplitConfig(40, 10, validation_source="test"))
    source = unique_source(n_train=100, n_test=200)  # 50 test images per class
    with pytest.raises(ValueError, match="fewer than 60"):
        make_splits(source, SplitConfig(60, 10, validation_source="test"))
    with pytest.raises(ValueError, match="leaves 0 for the stream and test pools"):
        make_splits(source, SplitConfig(50, 10, validation_source="test"))
    with pytest.raises(ValueError, match="validation_source must be one of train, test"):
        SplitConfig(validation_source="holdout")  # type: ignore[arg-type]


# --- the memorisation warning, on tiny nets that did and did not see the validation images ---

TINY_SPEC = InputSpec(1, SIDE, SIDE, (0.3,), (0.3,))
TINY_WIDTH = 16


def noisy_set(n: int, seed: int, share: float = 0.3) -> ImageSet:
    """The conftest's learnable toy images with ``share`` of the labels redrawn at random: a
    net can only get those right by memorising them, so memorisation shows as a CA gap."""
    data = synthetic_set(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    flip = torch.rand(n, generator=g) < share
    labels = data.labels.clone()
    labels[flip] = torch.randint(0, NUM_CLASSES, (int(flip.sum()),), generator=g)
    return data.relabel(labels)


def tiny_trained(data: ImageSet) -> Net:
    """A tiny CNN trained long enough (60 epochs) to fit every label of ``data``."""
    with seeded_rng(0):
        module = build_classifier("small_cnn", TINY_SPEC, NUM_CLASSES, width=TINY_WIDTH)
    net = Net(module, "zoo", TINY_SPEC, NUM_CLASSES, "small_cnn", {"width": TINY_WIDTH})
    train(net, data, TrainConfig(epochs=60, batch_size=32, lr=3e-3, seed=0), progress=False)
    return net


@pytest.fixture(scope="module")
def toy_world() -> dict[str, object]:
    """A public data set (400 training, 1,600 test images), a BadNet trained on its whole
    training split (it memorised it), and one trained on other images of the same kind."""
    public = DataSource("toy", noisy_set(400, seed=1), noisy_set(1600, seed=2))
    memorising = tiny_trained(public.train)
    # A net that saw none of them warns by chance in ~0.6 % of draws (z >= 2.5); this one
    # lands at |z| < 0.5, the memorising one at z > 20: neither is near the threshold.
    other = tiny_trained(noisy_set(400, seed=3))
    return {"source": public, "memorising": memorising, "other": other}


SMALL = {"validation_per_class": 60, "holdout_per_class": 20}


def test_memorisation_warning_tells_a_memorising_badnet_from_one_that_did_not(
    toy_world: dict[str, object],
) -> None:
    source, memorising, other = toy_world["source"], toy_world["memorising"], toy_world["other"]
    assert isinstance(source, DataSource) and isinstance(memorising, Net)
    assert isinstance(other, Net)
    from_train = make_splits(source, SplitConfig(**SMALL))
    from_test = make_splits(source, SplitConfig(**SMALL, validation_source="test"))
    # It really memorised: every (partly random) training label right, unseen ones far less.
    check = check_validation(memorising, from_train)
    assert check.source == "train" and check.validation_ca == pytest.approx(1.0)
    assert check.unseen_ca is not None and check.unseen_ca < 0.85
    assert check.gap is not None and check.z is not None
    assert check.gap >= MEMORISATION_MIN_GAP and check.z >= MEMORISATION_Z
    assert check.memorised and check.warning is not None
    assert "looks memorised" in check.warning and "--validation-source test" in check.warning
    assert check.unseen_images == 1600 and check.sizes == from_train.sizes()
    # The same BadNet with validation images from the test split: nothing to warn about.
    fresh = check_validation(memorising, from_test)
    assert fresh.source == "test" and not fresh.memorised and fresh.warning is None
    assert fresh.z is not None and abs(fresh.z) < MEMORISATION_Z
    # A net that never saw the training split does not warn with either source.
    for splits in (from_train, from_test):
        honest = check_validation(other, splits)
        assert not honest.memorised and honest.warning is None
        assert honest.z is not None and honest.z < MEMORISATION_Z
    # Both halves of the rule are needed: a gap under the floor, or under z, does not warn.
    assert not check_validation(memorising, from_train, min_gap=check.gap + 0.01).memorised
    assert not check_validation(memorising, from_train, z_threshold=check.z + 1).memorised


def test_unseen_accuracy_is_weighted_to_the_validation_class_mix() -> None:
    """A net right on class 0 only, with a pool mostly of class 0 and a class-balanced
    validation set: unweighted CAs would differ by ~60 points with nothing memorised."""

    class OnlyClassZero:
        def predict(self, images: torch.Tensor) -> torch.Tensor:
            return torch.zeros(images.shape[0], dtype=torch.int64)

    def part(labels: list[int]) -> ImageSet:
        n = len(labels)
        images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).to(torch.uint8)
        return ImageSet(images, torch.tensor(labels), CLASSES)

    balanced = part([0, 1, 2, 3] * 25)
    skewed = part([0] * 170 + [1, 2, 3] * 10)
    sp = Splits(attacker=balanced, retrain=balanced, holdout=balanced, stream=skewed, test=skewed)
    check = check_validation(OnlyClassZero(), sp)  # type: ignore[arg-type]
    assert check.validation_ca == pytest.approx(0.25) and check.unseen_ca == pytest.approx(0.25)
    assert check.gap == pytest.approx(0.0) and not check.memorised


# --- the command line: the option, the reports, the provenance, the warning on stderr ---

CLI_GRID = ["--arch", "small_cnn", "--arch-kwargs", json.dumps({"width": TINY_WIDTH}),
            "--alpha0", "3e-3", "--mean", "0.3", "--std", "0.3", "--alpha-multiples", "1",
            "--gammas", "0.3", "--epochs", "1", "--theta", "0.99",
            "--validation-per-class", "60", "--holdout-per-class", "20"]  # fmt: skip


def test_cli_validation_source_is_reported_and_a_memorised_badnet_warns(
    toy_world: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    source, memorising = toy_world["source"], toy_world["memorising"]
    assert isinstance(source, DataSource) and source.test is not None
    assert isinstance(memorising, Net)
    data = tmp_path / "public.npz"
    np.savez(
        data,
        images=source.train.images.numpy(),
        labels=source.train.labels.numpy(),
        test_images=source.test.images.numpy(),
        test_labels=source.test.labels.numpy(),
    )
    save_file(memorising.module.state_dict(), str(tmp_path / "bad.safetensors"))
    base = ["predeploy", "--badnet", str(tmp_path / "bad.safetensors"), "--dataset", str(data),
            *CLI_GRID]  # fmt: skip

    # default source (train): the BadNet was trained on the whole training split -> warning
    out = tmp_path / "from-train"
    assert main([*base, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: the BadNet looks memorised on its validation set" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["validation"]["source"] == "train" and report["validation"]["memorised"]
    assert report["validation"]["warning"] in captured.err
    assert "**Warning**" in (out / "report.md").read_text()
    provenance = load_bundle(out / "bundle").manifest.provenance
    assert provenance["validation"] == report["validation"]
    assert "validation_source" not in provenance["source"]["recipe"]["splits"]

    # --validation-source test: validation images it never saw, smaller pools, no warning
    out = tmp_path / "from-test"
    assert main([*base, "--validation-source", "test", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "looks memorised" not in captured.err
    report = json.loads((out / "report.json").read_text())
    check = report["validation"]
    assert check["source"] == "test" and not check["memorised"] and check["warning"] is None
    assert check["sizes"] == {
        "attacker": 400,
        "retrain": 160,
        "holdout": 80,
        "stream": 680,
        "test": 680,
    }
    bundle = load_bundle(out / "bundle")
    provenance = bundle.manifest.provenance
    assert provenance["validation"] == check
    recipe = Recipe.from_dict(provenance["source"]["recipe"])
    assert recipe.splits.validation_source == "test"
    # `stream` and `repair` read the pools from this recipe: they get the same, disjoint ones
    later = load_splits(recipe)
    assert later.sizes() == check["sizes"]
    tensors = bundle.tensors("validation")
    shipped = hashes(tensors["retrain_images"]) + hashes(tensors["holdout_images"])
    assert set(shipped) <= set(hashes(source.test.images))
    assert not set(shipped) & (set(hashes(later.stream.images)) | set(hashes(later.test.images)))


def test_cli_validation_source_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    with seeded_rng(0):
        module = build_classifier("small_cnn", InputSpec(1, 8, 8), 10, width=4)
    save_file(module.state_dict(), str(tmp_path / "bad.safetensors"))
    argv = ["predeploy", "--badnet", str(tmp_path / "bad.safetensors"), "--arch", "small_cnn",
            "--arch-kwargs", '{"width": 4}', "--alpha0", "1e-3", "--mean", "0", "--std", "1",
            "--dataset", "digits", "--out", str(tmp_path / "out")]  # fmt: skip
    # digits has no test split of its own: refused before the search, one line, exit 4
    assert main([*argv, "--validation-source", "test"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test split of its own" in err[0]
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--validation-source", "holdout"]) == EXIT_USAGE
    assert "--validation-source: invalid choice" in capsys.readouterr().err
