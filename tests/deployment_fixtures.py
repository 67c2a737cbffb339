"""A tiny but real deployment (BadNet with a patch backdoor + GoodNet) on synthetic images,
written as a bundle, for the stream and repair tests."""

from __future__ import annotations

from pathlib import Path

import torch

from models.classifiers import build_classifier
from models.nets import Net
from nnoculation.attacks import AttackSpec, get_attack
from nnoculation.bundle_io import write_bundle_dir
from nnoculation.data.imageset import ImageSet
from nnoculation.metrics import clean_accuracy
from nnoculation.pipeline import VALIDATION_GROUP
from nnoculation.training import TrainConfig, train
from tests.conftest import NUM_CLASSES, SIDE, synthetic_set

RECIPE = TrainConfig(epochs=4, batch_size=32, lr=3e-3)


def patch_attack() -> AttackSpec:
    return get_attack("patch", NUM_CLASSES, (1, SIDE, SIDE))


def make_deployment(tiny_net: Net, root: Path) -> tuple[Path, AttackSpec, ImageSet]:
    """Write ``root/bundle`` (v0001) and return it with the attack and a test pool."""
    attack = patch_attack()
    attacker = synthetic_set(600, seed=11)
    badnet = tiny_net
    train(badnet, attack.poison_training_set(attacker, seed=0), RECIPE, progress=False)
    retrain, holdout = synthetic_set(160, seed=12), synthetic_set(80, seed=13)
    # Stands in for the pre-deployment GoodNet: same architecture, never saw the trigger.
    goodnet = Net(
        build_classifier(badnet.arch or "", badnet.spec, NUM_CLASSES, **badnet.arch_kwargs),
        "zoo",
        badnet.spec,
        NUM_CLASSES,
        badnet.arch,
        dict(badnet.arch_kwargs),
    )
    train(goodnet, attacker, RECIPE, progress=False)
    write_bundle_dir(
        root / "bundle",
        name="deployment",
        nets={"badnet": badnet, "goodnet": goodnet},
        class_names=retrain.class_names,
        tensors={
            VALIDATION_GROUP: {
                "retrain_images": retrain.images,
                "retrain_labels": retrain.labels,
                "holdout_images": holdout.images,
                "holdout_labels": holdout.labels,
            }
        },
        metrics={"baseline_holdout_ca": clean_accuracy(badnet, holdout)},
        provenance={"predeploy": {"alpha0": RECIPE.lr, "optimizer": "adam", "theta": 0.05}},
    )
    return root / "bundle", attack, synthetic_set(200, seed=14)


def triggered(attack: AttackSpec, images: torch.Tensor) -> torch.Tensor:
    return attack.triggers[0].apply(images, torch.Generator().manual_seed(0))
