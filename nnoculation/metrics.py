"""CA, ASR per trigger and the floor (sec. 2.3), as fractions in [0, 1].

ASR is measured over triggered test images whose true label differs from the trigger's
target (all-to-all: every image, since y -> y + 1 never equals y). The *floor* is the same
measurement on a clean model trained the same way: the rate at which an honest net gives the
target label to those triggered images anyway. No ASR is reported without its floor.

An attack for evaluation is either a catalog :class:`~nnoculation.attacks.AttackSpec` (its
triggers are applied to the test pool) or a :class:`TriggeredSetAttack`, a user's own attack
known only by its triggered images, their true labels and the target(s) (a *triggered set*,
``nnoculation.attacks.triggered_set``); both give their ASR the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nnoculation.data.imageset import ImageSet

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from typing import TypeAlias

    from nnoculation.attacks import AttackSpec

    EvalAttack: TypeAlias = "AttackSpec | TriggeredSetAttack"

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


@dataclass(frozen=True)
class TriggeredSetAttack:
    """A user's own attack, known only by its triggered images (a *triggered set*).

    ``images`` are uint8 ``[N, C, H, W]`` inputs carrying the trigger, ``labels`` their true
    labels and ``targets`` the label the trigger sends each one to (int64 ``[N]``). Its ASR is
    the share of the images whose true label differs from their target that a net labels with
    the target, as for a catalog attack; it has no control triggers.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    source: str = ""  # the file it was read from, for error messages

    def __post_init__(self) -> None:
        n = self.images.shape[0] if self.images.dim() == 4 else -1
        if self.images.dtype != torch.uint8 or n < 1:
            raise ValueError(f"{self._where}images must be a non-empty uint8 [N, C, H, W] tensor")
        for label, values in (("labels", self.labels), ("targets", self.targets)):
            if values.shape != (n,) or values.dtype != torch.int64:
                raise ValueError(f"{self._where}{label} must be int64 [{n}]")
            if int(values.min()) < 0:
                raise ValueError(f"{self._where}{label} must be non-negative class indices")
        if not bool((self.labels != self.targets).any()):
            raise ValueError(
                f"{self._where}every image's true label equals its target: no image to "
                "measure the ASR on"
            )

    @property
    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def check_fits(self, shape: tuple[int, ...], num_classes: int) -> None:
        """Refuse (``ValueError``) images of another ``(C, H, W)`` or labels / targets that
        are not among the ``num_classes`` classes of the nets measured."""
        got = tuple(self.images.shape[1:])
        if got != tuple(shape):
            hint = ""
            if self.source and (got[1], got[2], got[0]) == tuple(shape):
                hint = (
                    "; the file's images look like [N, C, H, W], but a triggered set stores "
                    "them channels last, [N, H, W, C] (images.transpose(0, 2, 3, 1))"
                )
            raise ValueError(
                f"{self._where}triggered images are {list(got)} (C, H, W) but the nets take "
                f"{list(shape)}{hint}"
            )
        top = max(int(self.labels.max()), int(self.targets.max()))
        if top >= num_classes:
            raise ValueError(
                f"{self._where}label or target {top} does not exist among {num_classes} classes"
            )

    def evaluation_set(self) -> TriggeredSet:
        """The images whose true label differs from their target, with those targets."""
        keep = self.labels != self.targets
        return TriggeredSet(self.name, self.images[keep], self.targets[keep])


def triggered_sets(
    spec: EvalAttack, test: ImageSet, seed: int = EVAL_SEED, controls: bool = False
) -> list[TriggeredSet]:
    """One :class:`TriggeredSet` per trigger of ``spec`` (or per control trigger).

    A :class:`TriggeredSetAttack` brings its own images: ``test`` only fixes the shape and the
    classes they must fit, and it has one trigger and no controls.
    """
    if isinstance(spec, TriggeredSetAttack):
        spec.check_fits(tuple(test.images.shape[1:]), test.num_classes)
        return [] if controls else [spec.evaluation_set()]
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
    net: Predictor, test: ImageSet, spec: EvalAttack | None = None, seed: int = EVAL_SEED
) -> Evaluation:
    """CA on ``test`` and, when an attack is given (a catalog spec or a user's triggered
    set), ASR of each trigger and control."""
    ca = clean_accuracy(net, test)
    if spec is None:
        return Evaluation(ca, {})
    asr = {t.name: target_rate(net, t) for t in triggered_sets(spec, test, seed)}
    ctl = {t.name: target_rate(net, t) for t in triggered_sets(spec, test, seed, controls=True)}
    return Evaluation(ca, asr, ctl)
