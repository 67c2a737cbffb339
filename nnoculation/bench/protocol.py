"""The reporting protocol (issue 10, item 1): which data and which seeds a bench run uses.

Two splits keep tuning away from what is reported:

* ``report``: the recipe's split (``SplitConfig.seed = 0``), the one every figure in
  ``docs/results`` is measured on; a config seed ``s`` is the chain seed ``s``.
* ``tuning``: a pseudo test split carved (seeded) out of the publisher's *training* split,
  as large as its test split, then split with ``SplitConfig.seed = 1``; a config seed ``s``
  is the chain seed ``1_000_000 + s``. Where the publisher fixed a test split
  (Fashion-MNIST, a ``.npz`` with ``test_images``), no image a reported CA / ASR is measured
  on is ever seen while tuning. A data set without one (scikit-learn's digits) has a single
  pool of images: its tuning split is another seeded partition of them, so only the seeds
  are disjoint there.

One chain seed drives everything the defender does not control, so seeds vary the whole
chain: the stream's order and poisoned subset (``StreamConfig.seed``), the CycleGAN, the
domain-A draw and the fine-tune (``RepairConfig.seed``), the pre-deployment noise copies
and retraining order (``PredeployConfig.seed``), a baseline defense's draws
(``DefenseInputs.seed``) and, with ``vary_badnet`` (the default), the attacker's poisoned
subset, initialisation and training order (``TrainConfig.seed`` of the recipe; the clean
reference model, hence the floor, is trained with the same seed). Without ``vary_badnet``
every seed shares the split's first BadNet. The triggered test images stay fixed
(``nnoculation.metrics.EVAL_SEED``): they are the measurement, not the chain.

A smaller validation set (Table 9) is a share of the defender's parts of the same split
(:func:`defender_splits`), not another split: the attacker's set, the stream and test pools,
hence the BadNet and the floor, stay the same, and the shares are nested (25 % is part of
50 %, which is part of 75 %).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import DataSource
from nnoculation.data.splits import SplitConfig, Splits

Split = Literal["tuning", "report"]
SPLITS: tuple[Split, ...] = ("tuning", "report")
SPLIT_SEEDS: dict[Split, int] = {"report": 0, "tuning": 1}
SEED_BASES: dict[Split, int] = {"report": 0, "tuning": 1_000_000}
MAX_CONFIG_SEED = SEED_BASES["tuning"] - 1  # report seeds can never reach tuning ones


@dataclass(frozen=True)
class ChainSeeds:
    """The seeds one config seed stands for: the chain's, the BadNet's and the split's."""

    chain: int
    badnet: int
    split: int


def chain_seeds(split: Split, seed: int, vary_badnet: bool) -> ChainSeeds:
    """Config seed ``seed`` on ``split`` (see the module doc)."""
    if not 0 <= seed <= MAX_CONFIG_SEED:
        raise ValueError(f"a seed must lie in [0, {MAX_CONFIG_SEED}], got {seed}")
    base = SEED_BASES[split]
    return ChainSeeds(base + seed, base + seed if vary_badnet else base, SPLIT_SEEDS[split])


def split_source(source: DataSource, split: Split) -> DataSource:
    """The data a split draws from: the source itself for ``report``; for ``tuning``, its
    training split cut (seeded) into a training part and a pseudo test split as large as the
    publisher's test split (or ``SplitConfig.test_fraction`` of the images without one)."""
    if split == "report":
        return source
    train = source.train
    if source.test is not None:
        n_test = len(source.test)
    else:
        n_test = round(len(train) * SplitConfig.test_fraction)
    g = torch.Generator().manual_seed(SPLIT_SEEDS["tuning"])
    order = torch.randperm(len(train), generator=g)
    return DataSource(source.name, train.subset(order[n_test:]), train.subset(order[:n_test]))


def _share_index(part: ImageSet, share: float) -> torch.Tensor:
    """Positions of the first ``share`` of each class of ``part`` (at least one image of each
    class it holds), in the part's own order: the split already shuffled it, so a share is a
    seeded draw and a smaller share is part of a larger one."""
    keep = []
    for c in range(part.num_classes):
        members = torch.nonzero(part.labels == c).flatten()
        if members.numel():
            keep.append(members[: max(1, round(share * members.numel()))])
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.int64)


def defender_splits(splits: Splits, share: float) -> Splits:
    """``splits`` with the defender's validation set (``retrain`` and ``holdout``) cut to
    ``share`` of each class; everything else, the attacker's set and the pools, unchanged."""
    if not 0 < share <= 1:
        raise ValueError(f"a validation share lies in (0, 1], got {share}")
    if share == 1:
        return splits
    parts: dict[str, ImageSet] = {}
    origin = dict(splits.origin)
    for name in ("retrain", "holdout"):
        part: ImageSet = getattr(splits, name)
        idx = _share_index(part, share)
        parts[name] = part.subset(idx)
        if name in origin:
            where, positions = origin[name]
            origin[name] = (where, positions[idx])
    return replace(splits, retrain=parts["retrain"], holdout=parts["holdout"], origin=origin)
