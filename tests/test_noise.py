"""The noise operator matches imgaug's ReplaceElementwise(FromLowerResolution(Binomial(gamma),
size_px=4), Normal(128, 51.2), per_channel=True) statistically and structurally."""

from __future__ import annotations

import pytest
import torch

from nnoculation.noise import NoiseConfig, generator_for, noise_augment, noise_mask

CELL = 7  # 28 / 4


def test_mask_is_made_of_4x4_blocks_of_7x7_cells_on_28x28() -> None:
    mask = noise_mask((64, 1, 28, 28), 0.5, generator_for(0))
    blocks = mask.view(64, 1, 4, CELL, 4, CELL)
    first = blocks[:, :, :, :1, :, :1]
    assert torch.equal(blocks, first.expand_as(blocks)), "a cell is not uniform"
    assert mask.any() and not mask.all()


@pytest.mark.parametrize("gamma", [0.1, 0.3, 0.6])
def test_replaced_fraction_is_about_gamma(gamma: float) -> None:
    mask = noise_mask((4000, 1, 28, 28), gamma, generator_for(1))
    assert abs(mask.float().mean().item() - gamma) < 0.01


def test_masks_are_independent_per_channel() -> None:
    mask = noise_mask((2000, 3, 32, 32), 0.5, generator_for(2)).float()
    per_channel = mask.mean(dim=(2, 3))
    assert not torch.equal(mask[:, 0], mask[:, 1])
    corr = torch.corrcoef(per_channel.T)
    assert corr[0, 1].abs() < 0.1 and corr[1, 2].abs() < 0.1


def test_replacement_values_follow_normal_128_51_before_clipping() -> None:
    images = torch.zeros((3000, 1, 28, 28), dtype=torch.uint8)
    noisy = noise_augment(images, 1.0, generator_for(3)).float()
    cfg = NoiseConfig()
    # Clipping at 0 and 255 is ~0.6 % per side at 2.5 sd, so the moments stay close.
    assert abs(noisy.mean().item() - cfg.mean) < 1.0
    assert abs(noisy.std().item() - cfg.std) < 1.0
    assert noisy.min() == 0 and noisy.max() == 255, "values must be clipped to [0, 255]"
    frac_clipped = ((noisy == 0) | (noisy == 255)).float().mean().item()
    assert 0.005 < frac_clipped < 0.02


def test_untouched_pixels_keep_their_value_and_output_is_uint8() -> None:
    images = torch.full((50, 1, 28, 28), 17, dtype=torch.uint8)
    mask = noise_mask((50, 1, 28, 28), 0.4, generator_for(4))
    noisy = noise_augment(images, 0.4, generator_for(4))
    assert noisy.dtype == torch.uint8
    assert torch.equal(noisy[~mask], images[~mask])
    assert (noisy[mask] != 17).float().mean() > 0.9


def test_seeded_and_reproducible() -> None:
    images = torch.randint(0, 255, (10, 3, 32, 32), dtype=torch.uint8)
    a = noise_augment(images, 0.3, generator_for(5))
    b = noise_augment(images, 0.3, generator_for(5))
    c = noise_augment(images, 0.3, generator_for(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gamma_bounds_and_dtype_are_checked() -> None:
    with pytest.raises(ValueError, match="gamma must lie in"):
        noise_augment(torch.zeros((1, 1, 8, 8), dtype=torch.uint8), 1.5, generator_for(0))
    with pytest.raises(ValueError, match="uint8"):
        noise_augment(torch.zeros((1, 1, 8, 8)), 0.5, generator_for(0))
