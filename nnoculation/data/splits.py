"""The paper's data protocol (sec. 4.1, Table 3) as seeded, non-overlapping splits.

* ``attacker``: the attacker's training set, from which the BadNet is made;
* ``validation``: the defender's small clean set (default 500 per class), itself split into
  ``retrain`` (used to retrain / fine-tune) and ``holdout`` (used only to measure CA, e.g. for
  the selection rule of sec. 3.2);
* ``stream``: the pool the online stream is drawn from;
* ``test``: the final test pool every reported CA / ASR is measured on.

The stream and test pools come from the publisher's test split and never overlap each other
or the training side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import DataSource


@dataclass(frozen=True)
class SplitConfig:
    """Sizes of the protocol's parts; defaults follow Table 3 (MNIST row) for 10 classes."""

    validation_per_class: int = 500
    holdout_per_class: int = 100  # part of validation kept away from retraining, for CA
    stream_fraction: float = 0.5  # share of the test split given to the stream pool
    test_fraction: float = 0.15  # used only when the source has no test split of its own
    seed: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Splits:
    """The five disjoint parts of the protocol."""

    attacker: ImageSet
    retrain: ImageSet
    holdout: ImageSet
    stream: ImageSet
    test: ImageSet

    @property
    def validation(self) -> ImageSet:
        return ImageSet.concat([self.retrain, self.holdout])

    def sizes(self) -> dict[str, int]:
        return {
            name: len(getattr(self, name))
            for name in ("attacker", "retrain", "holdout", "stream", "test")
        }


def _per_class_take(
    labels: torch.Tensor, per_class: int, num_classes: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``per_class`` random items of each class, and of the rest (both shuffled)."""
    order = torch.randperm(labels.numel(), generator=g)
    taken: list[torch.Tensor] = []
    for c in range(num_classes):
        members = order[labels[order] == c]
        if members.numel() < per_class:
            raise ValueError(
                f"class {c} has {members.numel()} images, fewer than {per_class} asked for"
            )
        taken.append(members[:per_class])
    chosen = torch.cat(taken)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[chosen] = False
    rest = order[mask[order]]
    return chosen[torch.randperm(chosen.numel(), generator=g)], rest


def make_splits(source: DataSource, config: SplitConfig | None = None) -> Splits:
    """Split ``source`` following the protocol; the same config always gives the same parts."""
    cfg = config or SplitConfig()
    if cfg.holdout_per_class >= cfg.validation_per_class:
        raise ValueError("holdout_per_class must be smaller than validation_per_class")
    g = torch.Generator().manual_seed(cfg.seed)
    train, test = source.train, source.test
    if test is None:
        order = torch.randperm(len(train), generator=g)
        n_test = round(len(train) * cfg.test_fraction)
        test, train = train.subset(order[:n_test]), train.subset(order[n_test:])
    k = train.num_classes
    val_idx, attacker_idx = _per_class_take(train.labels, cfg.validation_per_class, k, g)
    validation = train.subset(val_idx)
    hold_idx, retrain_idx = _per_class_take(validation.labels, cfg.holdout_per_class, k, g)
    order = torch.randperm(len(test), generator=g)
    n_stream = round(len(test) * cfg.stream_fraction)
    return Splits(
        attacker=train.subset(attacker_idx),
        retrain=validation.subset(retrain_idx),
        holdout=validation.subset(hold_idx),
        stream=test.subset(order[:n_stream]),
        test=test.subset(order[n_stream:]),
    )
