"""Trigger reverse-engineering: learn poison(x) from clean validation images (domain A) and
quarantined images (domain B), sec. 3.3.

Two kinds of *repair profile* share one registry, so the CLI, the benchmarks and the worker
select them by name alike:

* every CycleGAN profile of :data:`models.cyclegan.CYCLEGAN_PROFILES` (``paper``, ``cpu``, ...):
  the generator G_AB is the learned poison(x);
* ``mean-diff``, the simpler alternative of sec. 6.2: the mean quarantined image minus the mean
  clean image, added to any input as a fixed trigger. It works for additive, fixed-location
  triggers and is expected to fail on variable-location ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from models.cyclegan import CYCLEGAN_PROFILES, CycleGANProfile, ResnetGenerator
from nnoculation.repair.cyclegan import EpochCallback, train_cyclegan, translate

MEAN_DIFF = "mean-diff"
PIXEL_MAX = 255


class PoisonModel(Protocol):
    """A learned approximation of the attacker's poison(x) on uint8 images."""

    kind: str
    seconds: float

    def apply(self, images: torch.Tensor) -> torch.Tensor: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def report(self) -> dict[str, Any]: ...


@dataclass
class GeneratorPoison:
    """poison(x) = G_AB(x), the CycleGAN generator (sec. 3.3)."""

    generator: nn.Module
    profile: dict[str, Any]
    seconds: float
    losses: list[dict[str, float]] = field(default_factory=list)
    epochs_done: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    kind: str = "cyclegan"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return translate(self.generator, images)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}

    def report(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "profile": self.profile,
            "seconds": self.seconds,
            "epochs_done": self.epochs_done,
            "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from_epoch,
            "losses": self.losses,
        }


@dataclass
class MeanDiffPoison:
    """poison(x) = clip(x + mean(quarantine) - mean(validation)) (sec. 6.2 ablation)."""

    delta: torch.Tensor
    seconds: float
    kind: str = MEAN_DIFF

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        shifted = images.to(torch.float32) + self.delta.to(images.device)
        return shifted.round().clamp(0, PIXEL_MAX).to(torch.uint8)

    def state(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta.contiguous()}

    def report(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seconds": self.seconds,
            "delta_l1": float(self.delta.abs().mean()),
        }


def load_poison(
    report: dict[str, Any], state: dict[str, torch.Tensor], channels: int
) -> PoisonModel:
    """Rebuild a stored trigger model from its ``report()`` and ``state()`` (as a repaired
    bundle keeps them: the provenance's repair entry and the ``trigger_model`` tensors)."""
    if report["kind"] == MEAN_DIFF:
        return MeanDiffPoison(state["delta"], float(report.get("seconds", 0.0)))
    profile = CycleGANProfile.from_dict(report["profile"])
    generator = ResnetGenerator(channels, profile.ngf, profile.n_blocks)
    generator.load_state_dict(state)
    return GeneratorPoison(generator.eval(), report["profile"], float(report.get("seconds", 0.0)))


def repair_profiles() -> list[str]:
    """Every selectable profile: the CycleGAN ones and the mean-difference ablation."""
    return sorted([*CYCLEGAN_PROFILES.names(), MEAN_DIFF])


def fit_poison(
    profile: str,
    domain_a: torch.Tensor,
    domain_b: torch.Tensor,
    *,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    time_budget_s: float | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> PoisonModel:
    """Learn poison(x) with the named profile from uint8 domains A (clean) and B (quarantine);
    ``epochs`` and ``lr`` override the CycleGAN profile's. A CycleGAN trains on ``device``
    (default: CUDA when present) and calls ``on_epoch_end(epochs_done, losses)`` after each
    epoch's checkpoint (see :func:`train_cyclegan`); the generator comes back on the CPU. The
    mean-difference model has no epochs and never calls it."""
    start = time.perf_counter()
    if profile == MEAN_DIFF:
        delta = domain_b.to(torch.float32).mean(0) - domain_a.to(torch.float32).mean(0)
        return MeanDiffPoison(delta, time.perf_counter() - start)
    cyclegan = CYCLEGAN_PROFILES.get(profile)
    if lr is not None:
        cyclegan = replace(cyclegan, lr=lr)
    result = train_cyclegan(
        domain_a,
        domain_b,
        cyclegan,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        time_budget_s=time_budget_s,
        epochs=epochs,
        progress=progress,
        device=device,
        on_epoch_end=on_epoch_end,
    )
    return GeneratorPoison(
        generator=result.generator,
        profile=result.profile.to_dict(),
        seconds=result.seconds,
        losses=result.losses,
        epochs_done=result.epochs_done,
        stopped_early=result.stopped_early,
        resumed_from_epoch=result.resumed_from_epoch,
    )
