"""The treatment set D_treat (sec. 3.3): poison(validation) with the validation labels, where
part of the images come from a per-pixel affine fit of the trigger model (a denoised copy).

Why the affine part. The CPU-sized CycleGAN learns the trigger well enough to fire the BadNet,
but its outputs carry texture and lose image detail (see the sample grids in
``docs/results/repair.md``). Fine-tuning on them teaches the nets "textured and triggered ->
true label", which generalises only part of the way to the attacker's clean trigger. A
least-squares fit ``poison(x) ~ scale * x + shift`` per pixel over the whole validation set
averages the texture out and is exact for every trigger that is affine per pixel: a patch or
pattern at a fixed place, a blended image, a tone filter's lift and vignette (and close to its
contrast curve). It cannot express a trigger whose place varies with the input (the fit then
smears it into a faint blur), so only a share of the treatment images (``affine_share``) comes
from it and the rest stay G(x): variable-location triggers keep their coverage.

Half of the treatment comes from the fit by default (``affine_share`` 0.5; 0 gives the paper's
all-G(x) treatment). ``make results-repair`` measures the repair without it beside the default
(column "same G, all G(x) treatment").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nnoculation.data.imageset import ImageSet
from nnoculation.repair.reverse import PIXEL_MAX, PoisonModel

MIN_VARIANCE = 1.0  # grey levels^2: a pixel that barely varies over validation gets shift only
DEFAULT_AFFINE_SHARE = 0.5


@dataclass
class AffinePoison:
    """poison(x) ~ clip(scale * x + shift), one (scale, shift) per pixel and channel."""

    scale: torch.Tensor
    shift: torch.Tensor

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = self.scale * images.to(torch.float32) + self.shift
        return out.round().clamp(0, PIXEL_MAX).to(torch.uint8)


def fit_affine(clean: torch.Tensor, poisoned: torch.Tensor) -> AffinePoison:
    """Per-pixel least squares of ``poisoned`` on ``clean`` (uint8 ``[N, C, H, W]`` each)."""
    if clean.shape != poisoned.shape or clean.shape[0] < 2:
        raise ValueError("fit_affine needs two image batches of one shape, at least 2 images")
    x, y = clean.to(torch.float32), poisoned.to(torch.float32)
    mean_x, mean_y = x.mean(0), y.mean(0)
    variance = ((x - mean_x) ** 2).mean(0)
    covariance = ((x - mean_x) * (y - mean_y)).mean(0)
    varies = variance > MIN_VARIANCE
    scale = torch.where(varies, covariance / variance.clamp_min(MIN_VARIANCE), 0.0)
    return AffinePoison(scale=scale, shift=mean_y - scale * mean_x)


def make_treatment(
    poison: PoisonModel,
    validation: ImageSet,
    affine_share: float = 0.0,
    seed: int = 0,
) -> ImageSet:
    """D_treat = poison(D_valid) with the validation (true) labels; a seeded ``affine_share``
    of the images is replaced by the affine fit of poison over the whole validation set."""
    if not 0.0 <= affine_share <= 1.0:
        raise ValueError(f"affine_share must lie in [0, 1], got {affine_share}")
    images = poison.apply(validation.images)
    count = round(affine_share * len(validation))
    if count and len(validation) >= 2:
        g = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(validation), generator=g)[:count]
        affine = fit_affine(validation.images, images)
        images[chosen] = affine.apply(validation.images[chosen])
    return validation.with_images(images)
