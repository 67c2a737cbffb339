"""One end-to-end check on real Fashion-MNIST (a subset): attack, then pre-deployment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.bundle import load_bundle
from nnoculation.badnets import make_badnet
from nnoculation.data.sources import DataSource, load_fashion_mnist
from nnoculation.data.splits import SplitConfig, make_splits
from nnoculation.pipeline import predeploy_to_dir
from nnoculation.predeploy import PredeployConfig
from nnoculation.recipes import FASHION_MNIST_RECIPE

pytestmark = pytest.mark.slow


def test_patch_badnet_then_goodnet_on_a_fashion_mnist_subset(tmp_path: Path) -> None:
    full = load_fashion_mnist()
    assert full.test is not None
    g = torch.Generator().manual_seed(0)
    source = DataSource(
        "fashion-mnist-subset",
        full.train.subset(torch.randperm(len(full.train), generator=g)[:9000]),
        full.test.subset(torch.randperm(len(full.test), generator=g)[:2000]),
    )
    recipe = FASHION_MNIST_RECIPE.with_(
        train=FASHION_MNIST_RECIPE.train.with_(epochs=3),
        splits=SplitConfig(validation_per_class=100, holdout_per_class=40),
    )
    splits = make_splits(source, recipe.splits)
    report = make_badnet(
        "patch", recipe, tmp_path / "patch", tmp_path / "cache", splits=splits, progress=False
    )
    assert report.badnet.ca > 0.75
    assert report.badnet.asr["patch"] > 0.9
    assert report.floor["patch"] < 0.2

    bundle = load_bundle(tmp_path / "patch" / "badnet")
    cfg = PredeployConfig(
        alpha0=1e-3, alpha_multiples=(1.0, 5.0), gammas=(0.3, 0.6), epochs=3, theta=0.05
    )
    outcome = predeploy_to_dir(
        bundle.net("badnet"),
        splits,
        cfg,
        tmp_path / "pre",
        attack=report.attack,
        floor=report.floor,
    )
    result = outcome.result
    assert result.picked is not None and result.goodnet_test is not None
    assert result.picked.holdout_ca >= result.baseline_ca - cfg.theta
    assert result.goodnet_test.asr["patch"] < report.badnet.asr["patch"]
    deployed = load_bundle(tmp_path / "pre" / "bundle")
    assert set(deployed.roles) == {"badnet", "goodnet"}
    assert deployed.tensors("validation")["holdout_labels"].numel() == 400
    assert (tmp_path / "pre" / "heatmap_asr.png").stat().st_size > 0
