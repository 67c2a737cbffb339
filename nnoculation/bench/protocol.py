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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from nnoculation.data.sources import DataSource
from nnoculation.data.splits import SplitConfig

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
