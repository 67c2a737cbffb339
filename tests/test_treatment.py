"""The treatment set: the per-pixel affine fit of a trigger model and the mixed treatment."""

from __future__ import annotations

import pytest
import torch

from nnoculation.repair.reverse import fit_poison
from nnoculation.repair.treatment import fit_affine, make_treatment
from tests.conftest import synthetic_set


def _tone_filter(images: torch.Tensor) -> torch.Tensor:
    """An affine per-pixel trigger: lifted blacks, lower contrast, a bright corner square."""
    out = 0.6 * images.to(torch.float32) + 50.0
    out[..., :3, :3] = 250.0
    return out.round().clamp(0, 255).to(torch.uint8)


def test_affine_fit_recovers_an_affine_trigger() -> None:
    clean = synthetic_set(200, seed=3).images
    fit = fit_affine(clean, _tone_filter(clean))
    unseen = synthetic_set(20, seed=4).images
    assert (fit.apply(unseen).int() - _tone_filter(unseen).int()).abs().max() <= 1
    inner = fit.scale[..., 5:, 5:]  # rounding to uint8 blurs the slope a little
    assert torch.allclose(inner, torch.full_like(inner, 0.6), atol=2e-3)


def test_affine_fit_averages_out_input_dependent_noise() -> None:
    clean = synthetic_set(400, seed=5).images
    g = torch.Generator().manual_seed(6)
    noise = torch.randint(-30, 31, clean.shape, generator=g)
    textured = (_tone_filter(clean).int() + noise).clamp(0, 255).to(torch.uint8)
    fit = fit_affine(clean, textured)
    err_fit = (fit.apply(clean).float() - _tone_filter(clean).float()).abs().mean()
    err_textured = (textured.float() - _tone_filter(clean).float()).abs().mean()
    assert err_fit < err_textured / 3


def test_mixed_treatment_replaces_the_given_share_and_keeps_labels() -> None:
    clean = synthetic_set(40, seed=1)
    poison = fit_poison("mean-diff", clean.images, _tone_filter(clean.images))
    plain = make_treatment(poison, clean)
    mixed = make_treatment(poison, clean, affine_share=0.5, seed=0)
    assert torch.equal(mixed.labels, clean.labels)
    kept = (mixed.images == plain.images).flatten(1).all(1)
    affine = fit_affine(clean.images, plain.images)
    from_fit = (mixed.images == affine.apply(clean.images)).flatten(1).all(1)
    # Exactly half come from the affine fit, the other half are the plain treatment's.
    assert int(from_fit.sum()) == 20 and bool((from_fit ^ kept).all())
    assert torch.equal(make_treatment(poison, clean, 0.5, seed=0).images, mixed.images)


def test_affine_share_outside_the_unit_interval_is_refused() -> None:
    clean = synthetic_set(8, seed=1)
    poison = fit_poison("mean-diff", clean.images, _tone_filter(clean.images))
    with pytest.raises(ValueError, match="affine_share"):
        make_treatment(poison, clean, affine_share=1.5)
