"""The pre-deployment noise operator A(D, eta, gamma) of sec. 3.2, in torch.

The reference code builds it with imgaug::

    ReplaceElementwise(FromLowerResolution(Binomial(gamma), size_px=4),
                       Normal(128, 0.4 * 128), per_channel=True)

i.e. per image and per channel a 4x4 Bernoulli(gamma) mask is drawn, upsampled with
nearest-neighbour interpolation to H x W (a 28x28 image gets 7x7-pixel cells), and every
masked pixel is replaced by a draw from N(128, 51.2), rounded and clipped to [0, 255].
imgaug 0.4.0 does not import under NumPy 2, so this is a faithful re-implementation that is
batched, seeded and runs on whatever device the images live on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NoiseConfig:
    """Parameters of the operator; the defaults are imgaug's out-of-the-box ones (sec. 4.2.1)."""

    cells: int = 4  # FromLowerResolution(size_px=4): the mask is drawn on a 4x4 grid
    mean: float = 128.0  # Normal(128, ...)
    std: float = 0.4 * 128  # ... 0.4 * 128 = 51.2


def noise_mask(
    shape: tuple[int, int, int, int],
    gamma: float,
    generator: torch.Generator,
    cells: int = NoiseConfig.cells,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[N, C, H, W]`` mask: a ``cells x cells`` Bernoulli(gamma) grid per image and
    channel, upsampled nearest to ``H x W``."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    n, c, h, w = shape
    low = torch.rand((n, c, cells, cells), generator=generator, device=device) < gamma
    return F.interpolate(low.to(torch.float32), size=(h, w), mode="nearest") > 0.5


def noise_augment(
    images: torch.Tensor,
    gamma: float,
    generator: torch.Generator,
    config: NoiseConfig | None = None,
) -> torch.Tensor:
    """Return a noisy uint8 copy of uint8 ``images`` ``[N, C, H, W]`` (sec. 3.2, A(D, eta, gamma)).

    ``generator`` must live on the images' device; the same generator state gives the same
    output, so a seeded generator makes the augmentation reproducible.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 [N, C, H, W] images, got {images.dtype} {list(images.shape)}"
        )
    cfg = config or NoiseConfig()
    mask = noise_mask(tuple(images.shape), gamma, generator, cfg.cells, images.device)  # type: ignore[arg-type]
    values = torch.randn(images.shape, generator=generator, device=images.device)
    values = (values * cfg.std + cfg.mean).round_().clamp_(0, 255).to(torch.uint8)
    return torch.where(mask, values, images)


def generator_for(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
