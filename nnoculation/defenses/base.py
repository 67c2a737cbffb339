"""The defense contract: what every defense compared with NNoculation takes and returns.

A defense gets the BadNet and the defender's clean data (the same validation set NNoculation's
pre-deployment gets) and returns a :class:`Defended`: something that labels images, plus what it
cost offline and what it found. Detectors that refuse inputs (STRIP) answer
:data:`REJECTED` for them; :func:`nnoculation.metrics.evaluate` then counts a refused clean
input as misclassified and a refused triggered input as a failed attack, which is the CA / ASR
translation of the paper's section 4.3.

A new defense is one module in this package: a class with a ``name`` and a ``run`` method,
decorated with :func:`register` (the package finds its modules by itself).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from models.nets import Net
from nnoculation.data.imageset import ImageSet
from nnoculation.metrics import Predictor

REJECTED = -1  # the label a detector answers for an input it refuses


@dataclass(frozen=True)
class DefenseInputs:
    """What the defender has: the BadNet and clean, labelled validation data.

    ``retrain`` is for fine-tuning / optimisation, ``holdout`` for thresholds and accuracy
    bounds (the split NNoculation's selection rule uses); ``seed`` seeds every random draw.
    """

    badnet: Net
    retrain: ImageSet
    holdout: ImageSet
    seed: int = 0


@dataclass
class Defended:
    """A defense's result: the predictor to deploy and what it cost and found."""

    name: str
    predictor: Predictor
    offline_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class Defense(Protocol):
    """One defense: ``run`` does the offline work and returns what to deploy."""

    name: ClassVar[str]

    def run(self, inputs: DefenseInputs) -> Defended: ...


class Rejecting:
    """A net behind a detector: the net's label, or :data:`REJECTED` where ``refuse`` says so."""

    def __init__(self, net: Predictor, refuse: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.net, self.refuse = net, refuse

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        labels = self.net.predict(images).clone()
        labels[self.refuse(images)] = REJECTED
        return labels


_REGISTRY: dict[str, Callable[..., Defense]] = {}
D = TypeVar("D")


def register(cls: D) -> D:
    """Class decorator: make a defense available by its ``name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _REGISTRY:
        raise ValueError(f"defense {name!r} is registered twice")
    _REGISTRY[name] = cls  # type: ignore[assignment]
    return cls


def _discover() -> None:
    """Import every module of this package once, so each registers its defense: adding a
    defense is adding a file."""
    package = importlib.import_module(__package__ or "nnoculation.defenses")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "base":
            importlib.import_module(f"{package.__name__}.{module.name}")


def defense_names() -> list[str]:
    """Every defense in this package, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_defense(name: str, **options: Any) -> Defense:
    """A configured defense by name; ``ValueError`` naming the known ones otherwise."""
    _discover()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(defense_names())}") from None
    return factory(**options)


def timed(run: Callable[[], tuple[Predictor, dict[str, Any]]], name: str) -> Defended:
    """Run a defense's offline stage and wrap its result with the wall seconds it took."""
    start = time.perf_counter()
    predictor, details = run()
    return Defended(name, predictor, time.perf_counter() - start, details)
