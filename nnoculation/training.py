"""Supervised training and inference for classifiers held as :class:`models.nets.Net`.

One plain loop serves the attacker (making BadNets and clean reference models), the
pre-deployment retraining of sec. 3.2 and the fine-tuning of the repair stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.nets import Net
from nnoculation.data.imageset import ImageSet

Optimizer = Literal["adam", "sgd", "adadelta"]
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; stored in every bundle so any net can be re-made (and so the
    pre-deployment search knows the BadNet's original learning rate, sec. 4.2.1)."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def with_(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class TrainStats:
    epochs: int
    images_seen: int
    seconds: float
    final_loss: float


EpochData = Callable[[int], ImageSet]
"""Gives the training set of an epoch (lets fresh noise be drawn every epoch)."""


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def train(
    net: Net,
    data: ImageSet | EpochData,
    cfg: TrainConfig,
    desc: str = "train",
    progress: bool = True,
) -> TrainStats:
    """Train ``net`` in place with cross-entropy; ``data`` is a set or a per-epoch callback.

    Batches are drawn from a generator seeded with ``cfg.seed``, so the same inputs give the
    same weights on the same machine.
    """
    device = next(net.module.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(net.module.parameters(), cfg)
    net.train_mode(True)
    seen, loss_value, start = 0, float("nan"), time.perf_counter()
    bar = tqdm(
        total=cfg.epochs, desc=desc, disable=None if progress else True, leave=False, unit="ep"
    )
    try:
        for epoch in range(cfg.epochs):
            epoch_set = data(epoch) if callable(data) else data
            order = torch.randperm(len(epoch_set), generator=g)
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = net.spec.to_model_input(epoch_set.images[idx].to(device))
                y = epoch_set.labels[idx].to(device)
                loss = F.cross_entropy(net.module(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(idx)
                loss_value = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    finally:
        bar.close()
        net.train_mode(False)
    return TrainStats(cfg.epochs, seen, time.perf_counter() - start, loss_value)
