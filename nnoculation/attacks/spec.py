"""Attack specifications: a trigger function plus a target rule plus a poisoning policy.

An :class:`AttackSpec` is pure data (frozen, JSON round-trippable through ``to_dict`` /
``from_dict``) so every benchmark report can record exactly which BadNet it attacked with.
It knows how to build the attacker's poisoned training set (sec. 4.1, sec. 6.1) and the
triggered test images on which the attack success rate (ASR) is measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nnoculation.attacks.triggers import apply_trigger, resolve_params
from nnoculation.data.imageset import ImageSet
from nnoculation.noise import generator_for, noise_augment

ALL_TO_ONE = "all-to-one"
ALL_TO_ALL = "all-to-all"
RULE_KINDS = (ALL_TO_ONE, ALL_TO_ALL)

DIRTY_LABEL = "dirty-label"
CLEAN_LABEL = "clean-label"
COMBINATION = "combination"
POLICIES = (DIRTY_LABEL, CLEAN_LABEL, COMBINATION)

DEFAULT_POISON_RATE = 0.1
DEFAULT_CLEAN_LABEL_FRACTION = 0.8
DEFAULT_FEATURE_DAMPENING = 0.5  # Turner et al. [40]: make the trigger the easiest feature
# The adaptive attacker noises its own training set over the defender's gamma range (sec. 4.2.1,
# sec. 5.4): one gamma per image, drawn uniformly from these.
ADAPTIVE_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


@dataclass(frozen=True)
class TargetRule:
    """Where a trigger sends an input: ``all-to-one`` (always ``target``) or ``all-to-all``
    (``y -> (y + shift) mod C``, sec. 4.1, BadNet-AAA)."""

    kind: str = ALL_TO_ONE
    target: int | None = 0
    shift: int | None = None

    def __post_init__(self) -> None:
        if self.kind == ALL_TO_ONE:
            if self.target is None or self.target < 0 or self.shift is not None:
                raise ValueError("an all-to-one rule needs a target >= 0 and no shift")
        elif self.kind == ALL_TO_ALL:
            if self.shift is None or self.target is not None:
                raise ValueError("an all-to-all rule needs a shift and no target")
        else:
            raise ValueError(f"unknown target rule {self.kind!r}; known: {list(RULE_KINDS)}")

    @classmethod
    def all_to_one(cls, target: int) -> TargetRule:
        return cls(ALL_TO_ONE, target=int(target), shift=None)

    @classmethod
    def all_to_all(cls, shift: int = 1) -> TargetRule:
        return cls(ALL_TO_ALL, target=None, shift=int(shift))

    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Target labels (int64, like ``labels``) for inputs whose true labels are ``labels``."""
        labels = labels.to(torch.int64)
        if self.kind == ALL_TO_ALL:
            return (labels + int(self.shift or 0)) % num_classes
        target = int(self.target or 0)
        if target >= num_classes:
            raise ValueError(f"target {target} does not exist among {num_classes} classes")
        return torch.full_like(labels, target)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == ALL_TO_ALL:
            return {"kind": self.kind, "shift": self.shift}
        return {"kind": self.kind, "target": self.target}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetRule:
        if data["kind"] == ALL_TO_ALL:
            return cls.all_to_all(data["shift"])
        return cls(data["kind"], target=data.get("target"), shift=data.get("shift"))


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as pure JSON types (tuples become lists), so a round trip compares equal."""
    try:
        return json.loads(json.dumps(dict(params)))
    except TypeError as err:
        raise ValueError(f"trigger parameters must be JSON-serialisable: {err}") from None


@dataclass(frozen=True)
class Trigger:
    """One backdoor trigger: a :data:`TRIGGERS` function with its parameters, and its target."""

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    target: TargetRule = field(default_factory=lambda: TargetRule.all_to_one(0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _json_params(self.params))
        resolved = resolve_params(self.kind, self.params)  # unknown kind or parameter: fail now
        if self.kind == "combine":
            for step in resolved["steps"]:
                resolve_params(step["kind"], step.get("params", {}))

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The triggered copy of uint8 ``images`` ``[N, C, H, W]``."""
        return apply_trigger(self.kind, images, self.params, generator)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": _json_params(self.params),
            "target": self.target.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trigger:
        return cls(
            name=data["name"],
            kind=data["kind"],
            params=data.get("params", {}),
            target=TargetRule.from_dict(data["target"]),
        )


@dataclass(frozen=True)
class AttackSpec:
    """A backdoor attack: its triggers, the triggers that must not fire, and how it poisons.

    ``triggers`` each get their own ASR. ``controls`` must *not* fire (TCA's square alone and
    triangle alone, sec. 4.1); their "ASR" is reported too and should stay near the floor.
    ``policy``:

    - ``dirty-label``: a random ``poison_rate`` fraction of the training images is replaced by
      triggered copies relabelled to the target, split evenly among the triggers and drawn
      only from images whose true label differs from that trigger's target.
    - ``combination`` (TCA): as dirty-label, and for each control as many other images again
      are replaced by control-triggered copies that keep their true labels.
    - ``clean-label`` (sec. 6.1, BadNet-CLA): ``clean_label_fraction`` of each target class's
      images are mixed with other-class images by ``feature_dampening`` and triggered; no label
      changes and ``poison_rate`` is not used.

    ``noise_train`` (the adaptive attacker of sec. 5.4) appends a noise-augmented copy of the
    poisoned set, one gamma per image from :data:`ADAPTIVE_GAMMAS`, labels unchanged.
    """

    name: str
    description: str
    triggers: tuple[Trigger, ...]
    controls: tuple[Trigger, ...] = ()
    poison_rate: float = DEFAULT_POISON_RATE
    policy: str = DIRTY_LABEL
    noise_train: bool = False
    clean_label_fraction: float = DEFAULT_CLEAN_LABEL_FRACTION
    feature_dampening: float = DEFAULT_FEATURE_DAMPENING
    train_epochs: int | None = None  # the attacker's own training length, when it needs longer
    # The attacker's own architecture (zoo name + kwargs), when it differs from the recipe's.
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "triggers", tuple(self.triggers))
        object.__setattr__(self, "controls", tuple(self.controls))
        if not self.triggers:
            raise ValueError(f"attack {self.name!r} has no trigger")
        names = [t.name for t in self.evaluated]
        if len(set(names)) != len(names):
            raise ValueError(f"attack {self.name!r} repeats a trigger name: {names}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown poisoning policy {self.policy!r}; known: {list(POLICIES)}")
        if not 0.0 < self.poison_rate < 1.0:
            raise ValueError(f"poison_rate must lie in (0, 1), got {self.poison_rate}")
        for label, value in (
            ("clean_label_fraction", self.clean_label_fraction),
            ("feature_dampening", self.feature_dampening),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {value}")
        if self.policy == CLEAN_LABEL and any(t.target.kind != ALL_TO_ONE for t in self.triggers):
            raise ValueError("a clean-label attack needs all-to-one triggers")
        if self.policy == COMBINATION and not self.controls:
            raise ValueError("a combination attack needs control triggers")

    @property
    def evaluated(self) -> tuple[Trigger, ...]:
        """Every trigger whose ASR is reported: the attack's triggers, then its controls."""
        return self.triggers + self.controls

    def trigger(self, name: str) -> Trigger:
        """The trigger or control called ``name``."""
        for t in self.evaluated:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.evaluated)
        raise KeyError(f"attack {self.name!r} has no trigger {name!r}; known: {known}")

    # --- data ------------------------------------------------------------------------------

    def poison_training_set(self, train: ImageSet, seed: int) -> ImageSet:
        """The attacker's training set built from clean ``train`` (seeded, reproducible)."""
        g = generator_for(seed, train.images.device)
        images = train.images.clone()
        labels = train.labels.clone()
        free = torch.ones(len(train), dtype=torch.bool, device=train.labels.device)
        if self.policy == CLEAN_LABEL:
            self._poison_clean_label(train, images, free, g)
        else:
            poisoned = self._poison_dirty_label(train, images, labels, free, g)
            if self.policy == COMBINATION:
                for control in self.controls:
                    idx = _draw(free, poisoned, g)
                    images[idx] = control.apply(train.images[idx], g)
                    free[idx] = False
        out = ImageSet(images, labels, train.class_names)
        if self.noise_train:
            out = ImageSet.concat([out, _noise_copy(out, g)])
        return out

    def clean_training_set(self, train: ImageSet, seed: int) -> ImageSet:
        """What a clean model "trained the same way" trains on: ``train`` without poison, but
        with the same augmentation policy (the adaptive attacker's noise copy)."""
        if not self.noise_train:
            return train
        return ImageSet.concat(
            [train, _noise_copy(train, generator_for(seed, train.images.device))]
        )

    def triggered(
        self, test: ImageSet, trigger: Trigger | str, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ASR evaluation data: ``trigger`` applied to every test image, the target labels,
        and ``keep_mask`` (true label != target), the images over which ASR is measured."""
        if isinstance(trigger, str):
            trigger = self.trigger(trigger)
        g = generator_for(seed, test.images.device)
        images = trigger.apply(test.images, g)
        targets = trigger.target.targets(test.labels, test.num_classes)
        return images, targets, test.labels != targets

    def _poison_dirty_label(
        self,
        train: ImageSet,
        images: torch.Tensor,
        labels: torch.Tensor,
        free: torch.Tensor,
        g: torch.Generator,
    ) -> int:
        """Replace triggered, relabelled copies in place; return how many were poisoned."""
        total = round(self.poison_rate * len(train))
        done = 0
        for trigger, count in zip(self.triggers, _split(total, len(self.triggers)), strict=True):
            targets = trigger.target.targets(train.labels, train.num_classes)
            idx = _draw(free & (train.labels != targets), count, g)
            images[idx] = trigger.apply(train.images[idx], g)
            labels[idx] = targets[idx]
            free[idx] = False
            done += int(idx.numel())
        return done

    def _poison_clean_label(
        self, train: ImageSet, images: torch.Tensor, free: torch.Tensor, g: torch.Generator
    ) -> None:
        """Make part of each target class hard, then trigger it, in place; labels stay true."""
        targets = [int(t.target.target or 0) for t in self.triggers]
        for trigger, target in zip(self.triggers, targets, strict=True):
            if target >= train.num_classes:
                raise ValueError(
                    f"target {target} does not exist among {train.num_classes} classes"
                )
            in_class = int((train.labels == target).sum())
            count = round(self.clean_label_fraction * in_class / targets.count(target))
            idx = _draw(free & (train.labels == target), count, g)
            if idx.numel() == 0:
                continue
            # Turner et al. make the poisoned target images *hard* so the net must lean on the
            # trigger; here, cheaply, by mixing in images of other classes (pixel-space
            # interpolation, the crude form of their latent interpolation).
            others = torch.nonzero(train.labels != target).flatten()
            mix = others[torch.randint(others.numel(), (idx.numel(),), generator=g)]
            x = train.images[idx].float()
            tau = self.feature_dampening
            x = (1 - tau) * x + tau * train.images[mix].float()
            images[idx] = trigger.apply(x.round().clamp(0, 255).to(torch.uint8), g)
            free[idx] = False

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "triggers": [t.to_dict() for t in self.triggers],
            "controls": [t.to_dict() for t in self.controls],
            "poison_rate": self.poison_rate,
            "policy": self.policy,
            "noise_train": self.noise_train,
            "clean_label_fraction": self.clean_label_fraction,
            "feature_dampening": self.feature_dampening,
            "train_epochs": self.train_epochs,
            "arch": self.arch,
            "arch_kwargs": None if self.arch_kwargs is None else _json_params(self.arch_kwargs),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttackSpec:
        return cls(
            name=data["name"],
            description=data.get("description", ""),
            triggers=tuple(Trigger.from_dict(t) for t in data["triggers"]),
            controls=tuple(Trigger.from_dict(t) for t in data.get("controls", ())),
            poison_rate=float(data.get("poison_rate", DEFAULT_POISON_RATE)),
            policy=data.get("policy", DIRTY_LABEL),
            noise_train=bool(data.get("noise_train", False)),
            clean_label_fraction=float(
                data.get("clean_label_fraction", DEFAULT_CLEAN_LABEL_FRACTION)
            ),
            feature_dampening=float(data.get("feature_dampening", DEFAULT_FEATURE_DAMPENING)),
            train_epochs=data.get("train_epochs"),
            arch=data.get("arch"),
            arch_kwargs=data.get("arch_kwargs"),
        )


def _split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal counts (the first ones take the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _draw(eligible: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """Up to ``count`` sorted indices drawn without replacement where ``eligible`` is set."""
    candidates = eligible.nonzero().squeeze(1)
    order = torch.randperm(candidates.numel(), generator=g, device=g.device)
    return candidates[order[:count].to(candidates.device)].sort().values


def _noise_copy(data: ImageSet, g: torch.Generator) -> ImageSet:
    """A noise-augmented copy of ``data``, one gamma per image from :data:`ADAPTIVE_GAMMAS`."""
    choice = torch.randint(len(ADAPTIVE_GAMMAS), (len(data),), generator=g, device=g.device)
    choice = choice.to(data.images.device)
    noisy = data.images.clone()
    for i, gamma in enumerate(ADAPTIVE_GAMMAS):
        idx = (choice == i).nonzero().squeeze(1)
        if idx.numel():
            noisy[idx] = noise_augment(data.images[idx], gamma, g)
    return data.with_images(noisy)


__all__ = [
    "ADAPTIVE_GAMMAS",
    "ALL_TO_ALL",
    "ALL_TO_ONE",
    "CLEAN_LABEL",
    "COMBINATION",
    "DIRTY_LABEL",
    "POLICIES",
    "AttackSpec",
    "TargetRule",
    "Trigger",
]
