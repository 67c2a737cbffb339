"""CA, ASR per trigger and the floor (sec. 2.3), as fractions in [0, 1].

ASR is measured over triggered test images whose true label differs from the trigger's
target (all-to-all: every image, since y -> y + 1 never equals y). The *floor* is the same
measurement on a clean model trained the same way: the rate at which an honest net gives the
target label to those triggered images anyway. No ASR is reported without its floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nnoculation.data.imageset import ImageSet

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from nnoculation.attacks import AttackSpec

EVAL_SEED = 1234  # fixes the variable-location placements of triggered test images


class Predictor(Protocol):
    """Anything that labels uint8 images: a :class:`models.nets.Net` or the ensemble."""

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


def clean_accuracy(net: Predictor, data: ImageSet) -> float:
    """Share of ``data`` that ``net`` labels correctly."""
    if len(data) == 0:
        raise ValueError("cannot measure accuracy on an empty set")
    return float((net.predict(data.images) == data.labels).float().mean())


@dataclass(frozen=True)
class TriggeredSet:
    """Triggered test images restricted to those whose true label differs from the target."""

    name: str
    images: torch.Tensor
    targets: torch.Tensor


def triggered_sets(
    spec: AttackSpec, test: ImageSet, seed: int = EVAL_SEED, controls: bool = False
) -> list[TriggeredSet]:
    """One :class:`TriggeredSet` per trigger of ``spec`` (or per control trigger)."""
    out = []
    for trigger in spec.controls if controls else spec.triggers:
        images, targets, keep = spec.triggered(test, trigger, seed)
        out.append(TriggeredSet(trigger.name, images[keep], targets[keep]))
    return out


def target_rate(net: Predictor, triggered: TriggeredSet) -> float:
    """Share of the triggered images that ``net`` labels with the attacker's target."""
    if triggered.targets.numel() == 0:
        return 0.0
    return float((net.predict(triggered.images) == triggered.targets).float().mean())


@dataclass(frozen=True)
class Evaluation:
    """CA plus ASR per trigger (and per control trigger) of one net."""

    ca: float
    asr: dict[str, float]
    controls: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ca": self.ca, "asr": self.asr, "controls": self.controls}


def evaluate(
    net: Predictor, test: ImageSet, spec: AttackSpec | None = None, seed: int = EVAL_SEED
) -> Evaluation:
    """CA on ``test`` and, when an attack spec is given, ASR of each trigger and control."""
    ca = clean_accuracy(net, test)
    if spec is None:
        return Evaluation(ca, {})
    asr = {t.name: target_rate(net, t) for t in triggered_sets(spec, test, seed)}
    ctl = {t.name: target_rate(net, t) for t in triggered_sets(spec, test, seed, controls=True)}
    return Evaluation(ca, asr, ctl)
