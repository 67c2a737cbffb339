"""CA, ASR over non-target images only, and the floor's clean reference model (cached)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nnoculation import badnets
from nnoculation.attacks import get_attack
from nnoculation.badnets import make_badnet, reference_model
from nnoculation.data.sources import DataSource
from nnoculation.data.splits import SplitConfig, make_splits
from nnoculation.metrics import clean_accuracy, evaluate, triggered_sets
from nnoculation.recipes import Recipe
from nnoculation.training import TrainConfig
from tests.conftest import NUM_CLASSES, SIDE, synthetic_set


class Constant:
    """A predictor that always answers ``label``."""

    def __init__(self, label: int) -> None:
        self.label = label

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((images.shape[0],), self.label, dtype=torch.long)


def test_asr_counts_only_images_whose_label_is_not_the_target() -> None:
    test = synthetic_set(200, seed=0)
    patch = get_attack("patch", NUM_CLASSES, (1, SIDE, SIDE))
    (only,) = triggered_sets(patch, test)
    assert only.images.shape[0] == int((test.labels != 0).sum())
    ev = evaluate(Constant(0), test, patch)
    assert ev.ca == pytest.approx(float((test.labels == 0).float().mean()))
    assert ev.asr["patch"] == 1.0
    assert evaluate(Constant(1), test, patch).asr["patch"] == 0.0


def test_all_to_all_targets_every_image_with_y_plus_one() -> None:
    test = synthetic_set(200, seed=1)
    aaa = get_attack("all-to-all", NUM_CLASSES, (1, SIDE, SIDE))
    (only,) = triggered_sets(aaa, test)
    assert only.images.shape[0] == len(test)
    assert torch.equal(only.targets, (test.labels + 1) % NUM_CLASSES)
    # Answering 0 hits the target exactly for the images labelled C - 1.
    share = float((test.labels == NUM_CLASSES - 1).float().mean())
    assert evaluate(Constant(0), test, aaa).asr["pattern"] == pytest.approx(share)


def test_tca_controls_are_reported_separately() -> None:
    test = synthetic_set(100, seed=2)
    tca = get_attack("tca", NUM_CLASSES, (1, SIDE, SIDE))
    ev = evaluate(Constant(7 % NUM_CLASSES), test, tca)
    assert set(ev.controls) == {t.name for t in tca.controls} and len(ev.asr) == 1


def test_floor_comes_from_a_cached_clean_model_trained_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: dict[str, list[Any]] = {}  # what each training saw, by its progress label
    real_train = badnets.train

    def recording_train(net: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        trained.setdefault(kwargs.get("desc", ""), []).append(data)
        return real_train(net, data, *args, **kwargs)

    monkeypatch.setattr(badnets, "train", recording_train)
    source = DataSource("toy", synthetic_set(700, seed=3), synthetic_set(200, seed=4))
    recipe = Recipe(
        dataset="toy",
        arch="small_cnn",
        arch_kwargs={"width": 4},
        train=TrainConfig(epochs=2, batch_size=32, lr=3e-3),
        splits=SplitConfig(validation_per_class=20, holdout_per_class=5),
    )
    splits = make_splits(source, recipe.splits)
    report = make_badnet(
        "patch", recipe, tmp_path / "bad", tmp_path / "cache", splits=splits, progress=False
    )
    clean, seconds = reference_model(recipe, splits, tmp_path / "cache", progress=False)
    # The reference saw the attacker's training set unpoisoned, exactly.
    (seen,) = trained["clean reference"]
    assert torch.equal(seen.images, splits.attacker.images)
    assert torch.equal(seen.labels, splits.attacker.labels)
    assert report.clean.ca == pytest.approx(clean_accuracy(clean, splits.test))
    assert report.floor == evaluate(clean, splits.test, report.attack).asr
    again, seconds_again = reference_model(recipe, splits, tmp_path / "cache", progress=False)
    assert seconds_again == seconds, "the second call must load the cached model, not retrain"
    for a, b in zip(clean.module.parameters(), again.module.parameters(), strict=True):
        assert torch.equal(a, b)
    adaptive = get_attack("adaptive", NUM_CLASSES, (1, SIDE, SIDE))
    noisy, _ = reference_model(recipe, splits, tmp_path / "cache", adaptive, progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2, "noise-trained reference is its own"
    # ... and the noise-trained attacker's reference its clean set with the same noise copy.
    noisy_seen = trained["clean reference"][1]
    expected = adaptive.clean_training_set(splits.attacker, seed=recipe.train.seed)
    assert torch.equal(noisy_seen.images, expected.images)
    assert torch.equal(noisy_seen.labels, expected.labels)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(clean.module.parameters(), noisy.module.parameters(), strict=True)
    )
