"""Quarantine purification: which quarantined images become the CycleGAN's domain B."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.nets import Net
from models.spec import InputSpec
from nnoculation.repair.purify import PurifyConfig, purify_quarantine
from tests.conftest import NUM_CLASSES, SIDE


class _LabelFromFirstPixel(nn.Module):
    """Answers class ``k`` for an image whose top-left pixel is ``k`` (a stand-in BadNet whose
    answers the test chooses exactly)."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__()
        self.mean, self.std = spec.mean[0], spec.std[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixel = ((x[:, 0, 0, 0] * self.std + self.mean) * 255).round().long()
        return nn.functional.one_hot(pixel, NUM_CLASSES).float()


def _badnet(spec: InputSpec) -> Net:
    return Net(_LabelFromFirstPixel(spec), "zoo", spec, NUM_CLASSES, "first_pixel")


def _quarantine(labels: list[int]) -> torch.Tensor:
    """Images the stand-in BadNet labels ``labels``; pixel (1, 1) numbers them."""
    images = torch.zeros(len(labels), 1, SIDE, SIDE, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.uint8)
    images[:, 0, 1, 1] = torch.arange(len(labels), dtype=torch.uint8)
    return images


def test_keeps_only_the_inputs_given_the_over_represented_label(tiny_spec: InputSpec) -> None:
    labels = [2] * 70 + [0] * 10 + [1] * 10 + [3] * 10  # a target at 70 %, the rest at 10 %
    q = _quarantine(labels)
    out = purify_quarantine(q, _badnet(tiny_spec), NUM_CLASSES, PurifyConfig())
    assert out.applied
    assert out.target_labels == (2,)
    assert out.label_counts == (10, 10, 70, 10)
    assert torch.equal(out.images, q[:70])
    assert out.kept.tolist() == [True] * 70 + [False] * 30
    assert out.report()["kept"] == 70


def test_keeps_every_target_of_a_multi_target_attack(tiny_spec: InputSpec) -> None:
    labels = [1] * 35 + [3] * 35 + [0] * 15 + [2] * 15
    q = _quarantine(labels)
    out = purify_quarantine(q, _badnet(tiny_spec), NUM_CLASSES, PurifyConfig(min_share=0.2))
    assert out.applied
    assert out.target_labels == (1, 3)
    assert torch.equal(out.images, q[:70])


@pytest.mark.parametrize(
    ("labels", "cfg"),
    [
        # targets spread over every class (all-to-all): none explains half of the quarantine
        ([0] * 30 + [1] * 24 + [2] * 23 + [3] * 23, PurifyConfig(min_share=0.25)),
        # purification switched off
        ([2] * 70 + [0] * 30, PurifyConfig(enabled=False)),
    ],
)
def test_falls_back_to_the_whole_quarantine(
    tiny_spec: InputSpec, labels: list[int], cfg: PurifyConfig
) -> None:
    q = _quarantine(labels)
    out = purify_quarantine(q, _badnet(tiny_spec), NUM_CLASSES, cfg)
    assert not out.applied
    assert out.target_labels == ()
    assert torch.equal(out.images, q)
    assert bool(out.kept.all())


def test_rejects_impossible_thresholds() -> None:
    with pytest.raises(ValueError, match="min_share"):
        PurifyConfig(min_share=0.0)
    with pytest.raises(ValueError, match="min_kept"):
        PurifyConfig(min_kept=1.5)
