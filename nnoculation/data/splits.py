"""The paper's data protocol (sec. 4.1, Table 3) as seeded, non-overlapping splits.

* ``attacker``: the attacker's training set, from which the BadNet is made;
* ``validation``: the defender's small clean set (default 500 per class), itself split into
  ``retrain`` (used to retrain / fine-tune) and ``holdout`` (used only to measure CA, e.g. for
  the selection rule of sec. 3.2);
* ``stream``: the pool the online stream is drawn from;
* ``test``: the final test pool every reported CA / ASR is measured on.

The stream and test pools come from the publisher's test split and never overlap each other
or the training side. Where the validation set comes from is ``validation_source``:

* ``"train"`` (the default): drawn from the training split; the attacker's set is the rest of
  it, and the stream and test pools share the whole test split. A BadNet downloaded from
  elsewhere was often trained on that very public training split, so it may have memorised
  its validation images.
* ``"test"``: drawn from the test split, which a BadNet trained on the training split never
  saw; the stream and test pools share the rest of the test split (they shrink by the
  validation set's size), and the attacker's set is the whole training split. Needs a data set
  with a test split of its own (Fashion-MNIST, a ``.npz`` with ``test_images``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import DataSource

ValidationSource = Literal["train", "test"]
VALIDATION_SOURCES: tuple[ValidationSource, ...] = ("train", "test")
DEFAULT_VALIDATION_SOURCE: ValidationSource = "train"
PARTS = ("attacker", "retrain", "holdout", "stream", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Sizes of the protocol's parts; defaults follow Table 3 (MNIST row) for 10 classes."""

    validation_per_class: int = 500
    holdout_per_class: int = 100  # part of validation kept away from retraining, for CA
    stream_fraction: float = 0.5  # share of the test split given to the stream pool
    test_fraction: float = 0.15  # used only when the source has no test split of its own
    seed: int = 0
    validation_source: ValidationSource = DEFAULT_VALIDATION_SOURCE  # "train" or "test"

    def __post_init__(self) -> None:
        if self.validation_source not in VALIDATION_SOURCES:
            raise ValueError(
                f"validation_source must be one of {', '.join(VALIDATION_SOURCES)}, "
                f"got {self.validation_source!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON; ``validation_source`` only when it is not the default, so the
        recipes (and the cache keys and provenance of BadNets) made before it existed stay
        the same."""
        data: dict[str, Any] = asdict(self)
        if self.validation_source == DEFAULT_VALIDATION_SOURCE:
            del data["validation_source"]
        return data


@dataclass(frozen=True)
class Splits:
    """The five disjoint parts of the protocol.

    ``origin`` names, for each part, the publisher's split it was taken from (``"train"`` or
    ``"test"``) and the indices of its images there, in the part's order; a source without a
    test split of its own has every part in ``"train"``.
    """

    attacker: ImageSet
    retrain: ImageSet
    holdout: ImageSet
    stream: ImageSet
    test: ImageSet
    validation_source: ValidationSource = DEFAULT_VALIDATION_SOURCE
    origin: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict, compare=False)

    @property
    def validation(self) -> ImageSet:
        return ImageSet.concat([self.retrain, self.holdout])

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in PARTS}


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
    """Split ``source`` following the protocol; the same config always gives the same parts.

    Raises ``ValueError`` before any work when the config cannot be met: a hold-out as large as
    the validation set, a class with too few images, or ``validation_source="test"`` on a
    source without a test split or with too small a one to leave stream and test pools.
    """
    cfg = config or SplitConfig()
    if cfg.holdout_per_class >= cfg.validation_per_class:
        raise ValueError("holdout_per_class must be smaller than validation_per_class")
    from_test = cfg.validation_source == "test"
    if from_test and source.test is None:
        raise ValueError(
            f"validation source 'test' needs a data set with a test split of its own, and "
            f"{source.name!r} has none (Fashion-MNIST and a .npz with test_images / test_labels "
            "have one); use validation source 'train'"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    train = source.train
    train_idx = torch.arange(len(train))  # positions in the publisher's training split
    if source.test is None:
        order = torch.randperm(len(train), generator=g)
        n_test = round(len(train) * cfg.test_fraction)
        test, test_name, test_idx = train, "train", order[:n_test]
        train_idx = order[n_test:]
    else:
        test, test_name, test_idx = source.test, "test", torch.arange(len(source.test))
    k = train.num_classes
    if from_test:
        # The validation set comes out of the test split; the stream and test pools share the
        # rest, and the attacker keeps the whole training split.
        val_pos, pool_pos = _per_class_take(test.labels[test_idx], cfg.validation_per_class, k, g)
        val_base, val_name, val_idx = test, test_name, test_idx[val_pos]
        pool_idx, attacker_idx = test_idx[pool_pos], train_idx
    else:
        val_pos, attacker_pos = _per_class_take(
            train.labels[train_idx], cfg.validation_per_class, k, g
        )
        val_base, val_name, val_idx = train, "train", train_idx[val_pos]
        pool_idx, attacker_idx = test_idx, train_idx[attacker_pos]
    hold_pos, retrain_pos = _per_class_take(val_base.labels[val_idx], cfg.holdout_per_class, k, g)
    order = torch.randperm(len(pool_idx), generator=g)
    n_stream = round(len(pool_idx) * cfg.stream_fraction)
    stream_idx, pool_test_idx = pool_idx[order[:n_stream]], pool_idx[order[n_stream:]]
    if from_test and (stream_idx.numel() == 0 or pool_test_idx.numel() == 0):
        raise ValueError(
            f"the test split has {len(test_idx)} images: a validation set of "
            f"{cfg.validation_per_class} per class leaves {len(pool_idx)} for the stream and "
            "test pools, too few to give each one; ask for a smaller validation set"
        )
    origin = {
        "attacker": ("train", attacker_idx),
        "retrain": (val_name, val_idx[retrain_pos]),
        "holdout": (val_name, val_idx[hold_pos]),
        "stream": (test_name, stream_idx),
        "test": (test_name, pool_test_idx),
    }

    def part(name: str) -> ImageSet:
        where, idx = origin[name]
        return (train if where == "train" else test).subset(idx)

    return Splits(
        attacker=part("attacker"),
        retrain=part("retrain"),
        holdout=part("holdout"),
        stream=part("stream"),
        test=part("test"),
        validation_source=cfg.validation_source,
        origin=origin,
    )
