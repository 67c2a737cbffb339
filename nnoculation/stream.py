"""Offline simulation of deployment (sec. 3.3, 5.2): an online stream in which a fraction of
inputs carries the attacker's trigger runs through the ensemble; disagreements fill the
quarantine until it holds N inputs.

The attack spec is used only to *make* the stream (the attacker's side); the ensemble never
sees it. It is a catalog attack (its triggers are applied to stream-pool images) or a user's
triggered set (its images replace the poisoned stream inputs). Which quarantined inputs were
really poisoned is recorded for evaluation only, under keys prefixed ``eval_`` that the repair
never reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnoculation.attacks import AttackSpec
from nnoculation.data.imageset import ImageSet
from nnoculation.ensemble import Ensemble
from nnoculation.metrics import TriggeredSetAttack

DEFAULT_POISON_RATIO = 0.2  # sec. 5.2: "assuming that 20% of test inputs are poisoned"
DEFAULT_QUARANTINE_SIZE = 200  # sec. 4.2.2: N = 200
DEFAULT_STREAM_BATCH = 50  # inputs the simulated service classifies at a time


@dataclass(frozen=True)
class StreamConfig:
    poison_ratio: float = DEFAULT_POISON_RATIO
    quarantine_size: int = DEFAULT_QUARANTINE_SIZE
    triggers: tuple[str, ...] | None = None  # the attacker's triggers in use (None: all)
    batch_size: int = DEFAULT_STREAM_BATCH
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.poison_ratio <= 1:
            raise ValueError("poison_ratio must lie in [0, 1]")
        if self.quarantine_size < 1:
            raise ValueError("quarantine_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["triggers"] = None if self.triggers is None else list(self.triggers)
        return data


@dataclass
class StreamResult:
    """The quarantine after the stream, and how well it separated poisoned inputs."""

    images: torch.Tensor
    badnet_labels: torch.Tensor
    goodnet_labels: torch.Tensor
    poisoned: torch.Tensor  # evaluation only
    inputs_seen: int
    poisoned_seen: int
    caught_n_after: int | None  # inputs seen when the quarantine reached N
    seconds: float

    @property
    def precision(self) -> float:
        """Share of quarantined inputs that carried a trigger."""
        return float(self.poisoned.float().mean()) if self.poisoned.numel() else 0.0

    @property
    def recall(self) -> float:
        """Share of poisoned inputs seen that were quarantined."""
        return int(self.poisoned.sum()) / self.poisoned_seen if self.poisoned_seen else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "quarantined": int(self.images.shape[0]),
            "inputs_seen": self.inputs_seen,
            "poisoned_seen": self.poisoned_seen,
            "precision": self.precision,
            "recall": self.recall,
            "caught_n_after_inputs": self.caught_n_after,
            "seconds": self.seconds,
        }

    def save_npz(self, path: Path) -> Path:
        """Write the quarantine as ``.npz`` (NHWC uint8 ``images`` + both nets' labels)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp,
            images=self.images.permute(0, 2, 3, 1).numpy(),
            badnet_labels=self.badnet_labels.numpy(),
            goodnet_labels=self.goodnet_labels.numpy(),
            eval_poisoned=self.poisoned.numpy(),
        )
        tmp.replace(path)
        return path


def make_stream(
    pool: ImageSet, attack: AttackSpec | TriggeredSetAttack, cfg: StreamConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream in arrival order: uint8 images and a poisoned flag per input.

    Each input is poisoned with probability ``poison_ratio`` by one of the triggers in use,
    chosen uniformly; the attacker leaves an input clean when its true label already is the
    trigger's target (there is nothing to gain). A triggered set poisons by replacing the
    input with one of its own images (see :func:`_stream_from_set`).
    """
    if isinstance(attack, TriggeredSetAttack):
        return _stream_from_set(pool, attack, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    names = cfg.triggers or tuple(t.name for t in attack.triggers)
    triggers = [attack.trigger(n) for n in names]
    order = torch.randperm(len(pool), generator=g)
    images = pool.images[order].clone()
    labels = pool.labels[order]
    chosen = torch.randint(len(triggers), (len(pool),), generator=g)
    poisoned = torch.rand(len(pool), generator=g) < cfg.poison_ratio
    for k, trigger in enumerate(triggers):
        targets = trigger.target.targets(labels, pool.num_classes)
        idx = torch.nonzero(poisoned & (chosen == k) & (targets != labels)).flatten()
        if idx.numel():
            images[idx] = trigger.apply(images[idx], g)
        poisoned[(chosen == k) & (targets == labels)] = False
    return images, poisoned


def _stream_from_set(
    pool: ImageSet, attack: TriggeredSetAttack, cfg: StreamConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream for a user's triggered set: the shuffled pool, each input replaced with
    probability ``poison_ratio`` by a triggered image whose true label differs from its target
    (each used once, in a seeded random order, before any is used again)."""
    if cfg.triggers is not None and set(cfg.triggers) != {attack.name}:
        raise ValueError(
            f"the triggered set has one trigger, {attack.name!r}; asked for {list(cfg.triggers)}"
        )
    attack.check_fits(tuple(pool.images.shape[1:]), pool.num_classes)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pool), generator=g)
    images = pool.images[order].clone()
    poisoned = torch.rand(len(pool), generator=g) < cfg.poison_ratio
    usable = attack.evaluation_set().images
    idx = torch.nonzero(poisoned).flatten()
    rounds = -(-idx.numel() // len(usable))  # ceil: how often the set is gone through
    picks = [torch.randperm(len(usable), generator=g) for _ in range(rounds)]
    if picks:
        images[idx] = usable[torch.cat(picks)[: idx.numel()]]
    return images, poisoned


def simulate_stream(
    ensemble: Ensemble,
    pool: ImageSet,
    attack: AttackSpec | TriggeredSetAttack,
    cfg: StreamConfig,
) -> StreamResult:
    """Feed the stream through the ensemble in batches until N inputs are quarantined (or the
    pool runs out)."""
    start = time.perf_counter()
    images, poisoned = make_stream(pool, attack, cfg)
    kept: list[tuple[torch.Tensor, ...]] = []
    count, seen, caught = 0, 0, None
    for i in range(0, len(images), cfg.batch_size):
        batch = images[i : i + cfg.batch_size]
        out = ensemble.classify(batch)
        flags = out.disagree
        room = cfg.quarantine_size - count
        hits = torch.nonzero(flags).flatten()
        if hits.numel() >= room:
            last = int(hits[room - 1])  # the input that brings the quarantine to N
            hits = hits[:room]
            seen += last + 1
            caught = seen
        else:
            seen += len(batch)
        flags_p = poisoned[i : i + cfg.batch_size]
        kept.append((batch[hits], out.badnet_labels[hits], out.goodnet_labels[hits], flags_p[hits]))
        count += int(hits.numel())
        if caught is not None:
            break
    poisoned_seen = int(poisoned[:seen].sum())
    parts = list(zip(*kept, strict=True)) if kept else [[torch.zeros(0)]] * 4
    q_images, q_bad, q_good, q_poisoned = (torch.cat(list(p)) for p in parts)
    return StreamResult(
        images=q_images.to(torch.uint8).reshape(-1, *images.shape[1:]),
        badnet_labels=q_bad.long(),
        goodnet_labels=q_good.long(),
        poisoned=q_poisoned.bool(),
        inputs_seen=seen,
        poisoned_seen=poisoned_seen,
        caught_n_after=caught,
        seconds=time.perf_counter() - start,
    )
