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
from nnoculation.runtime import seeded_rng

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


@dataclass(frozen=True)
class Distillation:
    """Soft targets for part of a training set (knowledge distillation, Hinton et al. 2015).

    Row ``i`` of ``logits`` is the teacher's answer for image ``i`` of the training set; only
    the rows where ``mask`` is set are used. Their loss is ``(1 - weight) * CE(label) +
    weight * T^2 * KL(teacher_T || student_T)``; the other images keep plain cross-entropy.
    """

    logits: torch.Tensor
    mask: torch.Tensor
    weight: float
    temperature: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must lie in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {self.temperature}")
        if self.logits.shape[0] != self.mask.shape[0]:
            raise ValueError("distillation logits and mask must have one row per image")

    def loss(self, student: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of the per-image losses above."""
        ce = F.cross_entropy(student, labels, reduction="none")
        t = self.temperature
        teacher = F.softmax(self.logits[idx].to(student.device) / t, dim=1)
        kl = F.kl_div(F.log_softmax(student / t, dim=1), teacher, reduction="none").sum(1)
        soft = self.mask[idx].to(student.device)
        mixed = (1 - self.weight) * ce + self.weight * t * t * kl
        return torch.where(soft, mixed, ce).mean()


EpochData = Callable[[int], ImageSet]
"""Gives the training set of an epoch (lets fresh noise be drawn every epoch)."""

EpochEnd = Callable[[int, dict[str, float]], None]
"""Called after each epoch with the number of epochs done and ``{"loss": mean batch loss}``."""

LOSS = "loss"


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
    distill: Distillation | None = None,
    on_epoch_end: EpochEnd | None = None,
) -> TrainStats:
    """Train ``net`` in place with cross-entropy; ``data`` is a set or a per-epoch callback.

    ``distill`` adds soft targets to part of a fixed training set (the repair's fine-tune).
    ``on_epoch_end(epochs_done, {"loss": mean loss of the epoch})`` runs after every epoch; an
    exception it raises stops training (the net is left in eval mode, partly trained).
    Batches are drawn from a generator seeded with ``cfg.seed`` and dropout from torch's global
    RNG seeded with it inside a scope that restores the caller's RNG state afterwards, so the
    same inputs give the same weights on the same machine and the caller's random draws are
    not disturbed. A net that cannot get its training behaviour (an exported program whose
    batch norm or dropout mode was fixed at export) is refused:
    :class:`models.exported.NotTrainableError`.
    """
    net.check_trainable()
    if distill is not None and (callable(data) or len(data) != distill.mask.shape[0]):
        raise ValueError("distillation needs a fixed training set with one teacher row per image")
    device = next(net.module.parameters()).device
    with seeded_rng(cfg.seed, device):
        return _train(net, data, cfg, desc, progress, distill, device, on_epoch_end)


def _train(
    net: Net,
    data: ImageSet | EpochData,
    cfg: TrainConfig,
    desc: str,
    progress: bool,
    distill: Distillation | None,
    device: torch.device,
    on_epoch_end: EpochEnd | None,
) -> TrainStats:
    g = torch.Generator().manual_seed(cfg.seed)
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
            epoch_loss, batches = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = net.spec.to_model_input(epoch_set.images[idx].to(device))
                y = epoch_set.labels[idx].to(device)
                out = net.module(x)
                loss = F.cross_entropy(out, y) if distill is None else distill.loss(out, y, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(idx)
                loss_value = float(loss.detach())
                epoch_loss += loss_value
                batches += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, {LOSS: epoch_loss / max(batches, 1)})
    finally:
        bar.close()
        net.train_mode(False)
    return TrainStats(cfg.epochs, seen, time.perf_counter() - start, loss_value)
