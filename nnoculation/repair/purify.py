"""Quarantine purification: domain B keeps the quarantined inputs whose BadNet answer is one of
the over-represented labels.

Why. The quarantine holds every input on which BadNet and GoodNet disagree. Beside the
attacker's inputs it holds clean inputs that the two nets simply disagree on: on a 20 %
poisoned Fashion-MNIST stream those are 25 to 40 % of it (quarantine precision in
``docs/results/repair.md``). A CycleGAN fit to that mixture is taught to imitate images that
carry no trigger as well as the attacker's.

How. A backdoor with one target (all-to-one) or a few (multi-trigger, multi-target) makes the
BadNet's answers on the attacker's inputs pile up on its targets, while its answers on clean
disagreements spread over the classes it confuses. So the labels that hold at least
``min_share`` of the quarantine are taken for targets, and only the inputs the BadNet gives one
of them are kept. If those inputs are fewer than ``min_kept`` of the quarantine, no label
stands out (an all-to-all attack spreads its targets over every class, and a quarantine of
mostly clean disagreements has no target either) and the whole quarantine is used, as in the
paper. The step needs no labels and no knowledge of the attack; it runs the BadNet once over
the quarantine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from models.nets import Net

DEFAULT_MIN_SHARE = 0.15  # a label answered for >= 15 % of the quarantine is taken for a target
DEFAULT_MIN_KEPT = 0.5  # purify only when those labels explain at least half of the quarantine


@dataclass(frozen=True)
class PurifyConfig:
    """When a label counts as a target, and when the filter is applied at all."""

    enabled: bool = True
    min_share: float = DEFAULT_MIN_SHARE
    min_kept: float = DEFAULT_MIN_KEPT

    def __post_init__(self) -> None:
        if not 0 < self.min_share <= 1 or not 0 <= self.min_kept <= 1:
            raise ValueError("purify: need 0 < min_share <= 1 and 0 <= min_kept <= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Purified:
    """Domain B after purification and what the step decided, for the repair report."""

    images: torch.Tensor
    kept: torch.Tensor  # bool [N]: which quarantined images are in ``images``
    applied: bool
    target_labels: tuple[int, ...]
    label_counts: tuple[int, ...]

    def report(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "target_labels": list(self.target_labels),
            "badnet_label_counts": list(self.label_counts),
            "kept": int(self.images.shape[0]),
        }


def purify_quarantine(
    quarantine: torch.Tensor, badnet: Net, num_classes: int, cfg: PurifyConfig
) -> Purified:
    """The quarantined images whose BadNet label holds >= ``cfg.min_share`` of the quarantine,
    or the whole quarantine when purification is off or those keep < ``cfg.min_kept`` of it."""
    labels = badnet.predict(quarantine)
    counts = torch.bincount(labels, minlength=num_classes)
    total = max(len(quarantine), 1)
    targets = tuple(int(c) for c in torch.nonzero(counts >= cfg.min_share * total).flatten())
    keep = torch.isin(labels, torch.tensor(targets, dtype=torch.long))
    applied = cfg.enabled and bool(targets) and int(keep.sum()) >= cfg.min_kept * total
    if not applied:
        keep = torch.ones(len(quarantine), dtype=torch.bool)
    return Purified(
        images=quarantine[keep],
        kept=keep,
        applied=applied,
        target_labels=targets if applied else (),
        label_counts=tuple(int(c) for c in counts),
    )
