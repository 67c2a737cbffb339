"""Neural Cleanse (Wang et al., S&P 2019) as the reference implementation (bolunwang/backdoor)
runs it, the baseline of the paper's Table 5.

1. **Reverse engineering**, per label ``y``: a mask ``m`` ``[H, W]`` (shared by the channels)
   and a pattern ``p`` ``[C, H, W]`` in pixel space, held as unconstrained tensors through
   ``m = tanh(m') / (2 - eps) + 1/2`` and ``p = 255 * (tanh(p') / (2 - eps) + 1/2)`` (the
   reference's form of ``(tanh + 1) / 2``); ``x' = (1 - m) * x + m * p`` on the raw pixels;
   loss ``CE(f(x'), y) + cost * |m|_1``, Adam (lr 0.1, betas (0.5, 0.9)) from a random
   start. The cost follows the reference's schedule: it starts at 0, is set to ``init_cost``
   once the attack has succeeded on >= 99 % of the epoch's images for ``patience`` epochs in
   a row (counters and flags reset then), is multiplied by ``cost_multiplier`` after
   ``patience`` epochs at >= 99 % and divided by ``cost_multiplier ** 1.5`` after
   ``patience`` epochs below; the smallest-norm mask of an epoch at >= 99 % is kept, and a
   label stops early once its best norm has not improved for ``early_stop_patience`` epochs
   after the cost has gone both up and down. An "epoch" is ``samples_per_epoch`` images
   drawn in batches from the defender's retrain split (the reference's ``NB_SAMPLE``).
2. **Detection**: the MAD anomaly index of the masks' L1 norms (consistency constant 1.4826);
   a label whose norm lies below the median with an anomaly index above 2 is flagged.
3. **Mitigation by unlearning**: the BadNet is fine-tuned on the retrain split in which a
   fraction (20 %, as in the reference's paper) of the images carry the reversed trigger of
   the flagged label and keep their true label. Like NNoculation's authors, ``oracle_target``
   gives the attacker's target to unlearn when detection fails (flags nothing, or not that
   label); ``detect=False`` skips the scan and reverse-engineers the oracle label only.

The reference runs 1,000 epochs of 1,000 images per label; the defaults here (60 epochs, early
stop) are a budget the paper's small 28x28 nets can afford on a CPU.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.nets import Net
from nnoculation.data.imageset import ImageSet
from nnoculation.defenses.base import Defended, DefenseInputs, register, timed
from nnoculation.training import TrainConfig, train

CONSISTENCY_CONSTANT = 1.4826  # MAD -> standard deviation for normally distributed norms
TANH_EPSILON = 1e-7  # Keras's K.epsilon(), keeps arctanh finite at a mask value of 0 or 1
ADAM_BETAS = (0.5, 0.9)  # the reference's Adam(beta_1=0.5, beta_2=0.9)
COST_DOWN_POWER = 1.5  # the cost comes down by cost_multiplier ** 1.5
EARLY_STOP_PATIENCE_FACTOR = 5  # the reference example: EARLY_STOP_PATIENCE = 5 * PATIENCE
PIXEL_MAX = 255.0
LABEL_SEED_STRIDE = 100_003  # per-label generator seed = seed * stride + label


@dataclass(frozen=True)
class ReversedTrigger:
    """A reverse-engineered trigger of one label: mask ``[H, W]`` in [0, 1], pattern
    ``[C, H, W]`` in raw pixel values, the mask's L1 norm and how well it attacked."""

    label: int
    mask: torch.Tensor
    pattern: torch.Tensor
    norm: float
    attack_success: float
    reached: bool  # some epoch reached the attack-success threshold (else: the last mask)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on uint8 images ``[N, C, H, W]``: ``(1 - m) x + m p``, rounded."""
        mask = self.mask.to(images.device)
        pattern = self.pattern.to(images.device)
        mixed = (1 - mask) * images.float() + mask * pattern
        return mixed.round().clamp(0, PIXEL_MAX).to(torch.uint8)


@dataclass(frozen=True)
class CostSchedule:
    """What the adaptive cost did while one label was reverse-engineered."""

    epochs: int
    early_stopped: bool
    cost_set_epoch: int | None  # the epoch after which the cost went from 0 to init_cost
    ups: int
    downs: int
    cost_max: float
    cost_final: float


@dataclass(frozen=True)
class Anomaly:
    """The MAD outlier test over the mask norms (only scanned labels take part)."""

    median: float
    mad: float
    index: dict[int, float]
    flagged: list[int]  # below the median with index > threshold, smallest norm first


def mad_anomaly(norms: dict[int, float], threshold: float = 2.0) -> Anomaly:
    """Anomaly index ``|norm - median| / (1.4826 * median(|norm - median|))`` per label, as
    the reference's ``outlier_detection``; labels above the median are never flagged.

    A MAD of 0 (at least half the norms equal) gives an index of ``inf`` to every norm that
    differs from the median and 0 to the others.
    """
    if not norms:
        raise ValueError("the anomaly index needs at least one label's norm")
    values = list(norms.values())
    median = statistics.median(values)
    mad = CONSISTENCY_CONSTANT * statistics.median(abs(v - median) for v in values)
    index = {}
    for label, norm in norms.items():
        deviation = abs(norm - median)
        index[label] = deviation / mad if mad > 0 else (math.inf if deviation > 0 else 0.0)
    flagged = [y for y in norms if norms[y] <= median and index[y] > threshold]
    flagged.sort(key=lambda y: norms[y])
    return Anomaly(median, mad, index, flagged)


def choose_label(flagged: Sequence[int], oracle_target: int | None) -> tuple[int | None, str]:
    """The label to unlearn and where it came from: ``"detection"`` (the smallest-norm flagged
    label, or the oracle label when detection flagged it), ``"oracle"`` (detection flagged
    nothing, or not the oracle label: the paper's "oracular knowledge"), or ``"none"``."""
    if oracle_target is not None:
        return oracle_target, "detection" if oracle_target in flagged else "oracle"
    if flagged:
        return flagged[0], "detection"
    return None, "none"


def _to_tanh(values: torch.Tensor) -> torch.Tensor:
    """Inverse of ``tanh(v) / (2 - eps) + 1/2`` for values in [0, 1]."""
    return torch.atanh((values.clamp(0, 1) - 0.5) * (2 - TANH_EPSILON))


def _from_tanh(values: torch.Tensor) -> torch.Tensor:
    return torch.tanh(values) / (2 - TANH_EPSILON) + 0.5


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices: shuffled passes over ``range(n)``, like a Keras generator."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


@register
@dataclass(frozen=True)
class NeuralCleanse:
    """Neural Cleanse: reverse-engineer each label's trigger, flag outliers, unlearn.

    Options (reference values in brackets): ``epochs`` per label [1000], ``samples_per_epoch``
    [1000], ``batch_size`` [32], ``lr`` [0.1], ``init_cost`` [1e-3], ``cost_multiplier``
    [1.5], ``patience`` [5], ``attack_success`` [0.99], ``early_stop`` [on],
    ``early_stop_threshold`` [1.0], ``early_stop_patience`` [5 * patience when None],
    ``anomaly_threshold`` [2]; ``detect`` (False: no scan, only ``oracle_target`` is
    reverse-engineered), ``oracle_target`` (the label to unlearn when detection fails);
    unlearning: ``unlearn_epochs``, ``unlearn_lr`` (Adam), ``unlearn_batch_size``,
    ``unlearn_fraction`` [0.2]; ``progress`` shows a bar over the labels.
    """

    name: ClassVar[str] = "neural-cleanse"

    epochs: int = 60
    samples_per_epoch: int = 1000
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 5
    attack_success: float = 0.99
    early_stop: bool = True
    early_stop_threshold: float = 1.0
    early_stop_patience: int | None = None
    anomaly_threshold: float = 2.0
    detect: bool = True
    oracle_target: int | None = None
    unlearn_epochs: int = 5
    unlearn_lr: float = 1e-3
    unlearn_batch_size: int = 32
    unlearn_fraction: float = 0.2
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "samples_per_epoch": self.samples_per_epoch,
            "batch_size": self.batch_size,
            "patience": self.patience,
            "unlearn_epochs": self.unlearn_epochs,
            "unlearn_batch_size": self.unlearn_batch_size,
        }
        if self.early_stop_patience is not None:
            positive["early_stop_patience"] = self.early_stop_patience
        for key, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"neural-cleanse: {key} must be a positive integer, got {value!r}")
        for key, number in {
            "lr": self.lr,
            "init_cost": self.init_cost,
            "unlearn_lr": self.unlearn_lr,
            "early_stop_threshold": self.early_stop_threshold,
            "anomaly_threshold": self.anomaly_threshold,
        }.items():
            if not math.isfinite(number) or number <= 0:
                raise ValueError(f"neural-cleanse: {key} must be positive, got {number!r}")
        if not self.cost_multiplier > 1:
            raise ValueError(
                f"neural-cleanse: cost_multiplier must exceed 1, got {self.cost_multiplier!r}"
            )
        if not 0 < self.attack_success <= 1:
            raise ValueError(
                f"neural-cleanse: attack_success must lie in (0, 1], got {self.attack_success!r}"
            )
        if not 0 < self.unlearn_fraction <= 1:
            raise ValueError(
                "neural-cleanse: unlearn_fraction must lie in (0, 1], "
                f"got {self.unlearn_fraction!r}"
            )
        if self.oracle_target is not None and (
            isinstance(self.oracle_target, bool)
            or not isinstance(self.oracle_target, int)
            or self.oracle_target < 0
        ):
            raise ValueError(
                f"neural-cleanse: oracle_target must be a label, got {self.oracle_target!r}"
            )
        if not self.detect and self.oracle_target is None:
            raise ValueError(
                "neural-cleanse: detect=False needs oracle_target (the label to unlearn)"
            )

    def run(self, inputs: DefenseInputs) -> Defended:
        """Scan every label (or only the oracle's), flag outliers, unlearn the chosen trigger.

        The BadNet is left untouched; the predictor is an unlearned copy (or a plain copy when
        no label was flagged and no oracle was given).
        """
        badnet, retrain = inputs.badnet, inputs.retrain
        if len(retrain) == 0:
            raise ValueError("neural-cleanse needs a non-empty retrain split")
        if retrain.shape != badnet.spec.shape:
            raise ValueError(
                f"retrain images {retrain.shape} do not fit the net {badnet.spec.shape}"
            )
        if retrain.num_classes != badnet.num_classes:
            raise ValueError(
                f"the data has {retrain.num_classes} classes, the net {badnet.num_classes}"
            )
        if self.oracle_target is not None and self.oracle_target >= badnet.num_classes:
            raise ValueError(
                f"oracle_target {self.oracle_target} is not a label of a "
                f"{badnet.num_classes}-class net"
            )
        badnet.check_trainable()  # unlearning retrains it: refuse before the long scan
        defended = timed(lambda: self._run(inputs), self.name)
        defended.details["offline_seconds"] = defended.offline_seconds
        return defended

    def _run(self, inputs: DefenseInputs) -> tuple[Net, dict[str, Any]]:
        badnet = inputs.badnet
        if self.detect:
            labels = list(range(badnet.num_classes))
        else:
            assert self.oracle_target is not None  # checked in __post_init__
            labels = [self.oracle_target]
        triggers: dict[int, ReversedTrigger] = {}
        schedules: dict[int, CostSchedule] = {}
        seconds: dict[int, float] = {}
        bar = tqdm(
            labels,
            desc="neural-cleanse",
            disable=None if self.progress else True,
            leave=False,
            unit="label",
        )
        try:
            for label in bar:
                start = time.perf_counter()
                generator = torch.Generator().manual_seed(inputs.seed * LABEL_SEED_STRIDE + label)
                triggers[label], schedules[label] = reverse_engineer(
                    badnet, inputs.retrain, label, self, generator
                )
                seconds[label] = time.perf_counter() - start
                bar.set_postfix(label=label, norm=f"{triggers[label].norm:.1f}")
        finally:
            bar.close()
        norms = {y: t.norm for y, t in triggers.items()}
        anomaly = mad_anomaly(norms, self.anomaly_threshold) if self.detect else None
        flagged = anomaly.flagged if anomaly is not None else []
        used, source = choose_label(flagged, self.oracle_target)
        per_label = [None] * badnet.num_classes
        details: dict[str, Any] = {
            "labels_scanned": labels,
            "norms": _per_label(per_label, norms),
            "anomaly_index": (
                _per_label(per_label, {y: _finite(v) for y, v in anomaly.index.items()})
                if anomaly is not None
                else None
            ),
            "median_norm": anomaly.median if anomaly is not None else None,
            "mad": anomaly.mad if anomaly is not None else None,
            "flagged": flagged,
            "detected_target": flagged[0] if flagged else None,
            "oracle_target": self.oracle_target,
            "used_label": used,
            "label_source": source,
            "attack_success": _per_label(
                per_label, {y: t.attack_success for y, t in triggers.items()}
            ),
            "reached": _per_label(per_label, {y: t.reached for y, t in triggers.items()}),
            "holdout_success": _per_label(
                per_label,
                {y: trigger_success(badnet, inputs.holdout, t) for y, t in triggers.items()},
            ),
            "cost_schedule": _per_label(per_label, {y: asdict(s) for y, s in schedules.items()}),
            "seconds_per_label": _per_label(per_label, seconds),
            "options": asdict(self),
            "unlearn": None,
        }
        if used is None:
            return badnet.clone(), details
        net, triggered = unlearn(badnet, inputs.retrain, triggers[used], self, inputs.seed)
        details["unlearn"] = {
            "label": used,
            "triggered_images": triggered,
            "epochs": self.unlearn_epochs,
            "lr": self.unlearn_lr,
            "fraction": self.unlearn_fraction,
        }
        return net, details


def _per_label(template: list[Any], values: dict[int, Any]) -> list[Any]:
    """A list indexed by label, ``None`` for labels that were not scanned."""
    out = list(template)
    for label, value in values.items():
        out[label] = value
    return out


def _finite(value: float) -> float | None:
    """JSON has no infinity: a degenerate (MAD 0) index is written as ``None``."""
    return value if math.isfinite(value) else None


def reverse_engineer(
    net: Net,
    data: ImageSet,
    label: int,
    options: NeuralCleanse,
    generator: torch.Generator,
) -> tuple[ReversedTrigger, CostSchedule]:
    """The smallest mask (and its pattern) that sends >= ``attack_success`` of ``data`` to
    ``label``, by the reference's optimisation and cost schedule (module docstring).

    ``net`` is not changed (a frozen copy in eval mode is optimised through); ``generator``
    draws the random start and the batch order.
    """
    frozen = net.clone().train_mode(False)
    for parameter in frozen.module.parameters():
        parameter.requires_grad_(False)
    device = frozen.device
    c, h, w = data.shape
    mask_tanh = _to_tanh(torch.rand(1, 1, h, w, generator=generator)).to(device).requires_grad_()
    pattern_tanh = _to_tanh(torch.rand(1, c, h, w, generator=generator)).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_tanh, pattern_tanh], lr=options.lr, betas=ADAM_BETAS)
    images = data.images.to(device)
    batches = _batches(len(data), options.batch_size, generator)
    steps = max(1, options.samples_per_epoch // options.batch_size)
    es_patience = options.early_stop_patience or EARLY_STOP_PATIENCE_FACTOR * options.patience
    down = options.cost_multiplier**COST_DOWN_POWER
    thr = options.attack_success

    cost = 0.0  # the reference's RESET_COST_TO_ZERO: start without the L1 term
    best_reg, best_mask, best_pattern, best_success = math.inf, None, None, 0.0
    set_counter = up_counter = down_counter = es_counter = 0
    up_flag = down_flag = early_stopped = False
    es_best = math.inf
    cost_set_epoch, ups, downs, cost_max, epochs_run = None, 0, 0, 0.0, 0
    for epoch in range(options.epochs):
        epochs_run = epoch + 1
        hits = seen = 0
        reg_sum = 0.0
        for _ in range(steps):
            idx = next(batches).to(device)
            mask, pattern = _from_tanh(mask_tanh), PIXEL_MAX * _from_tanh(pattern_tanh)
            x = (1 - mask) * images[idx].float() + mask * pattern
            logits = frozen.logits(x)
            target = torch.full((len(idx),), label, dtype=torch.int64, device=device)
            reg = mask.sum()
            loss = F.cross_entropy(logits, target) + cost * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += int((logits.detach().argmax(1) == target).sum())
            seen += len(idx)
            reg_sum += float(reg.detach()) * len(idx)
        success, avg_reg = hits / seen, reg_sum / seen
        if success >= thr and avg_reg < best_reg:
            best_reg, best_success = avg_reg, success
            best_mask = _from_tanh(mask_tanh.detach())[0, 0].cpu()
            best_pattern = (PIXEL_MAX * _from_tanh(pattern_tanh.detach()))[0].cpu()
        if options.early_stop:
            if best_reg < math.inf:
                es_counter = (
                    es_counter + 1 if best_reg >= options.early_stop_threshold * es_best else 0
                )
            es_best = min(best_reg, es_best)
            if down_flag and up_flag and es_counter >= es_patience:
                early_stopped = True
                break
        if cost == 0 and success >= thr:
            set_counter += 1
            if set_counter >= options.patience:
                cost, cost_set_epoch = options.init_cost, epochs_run
                up_counter = down_counter = 0
                up_flag = down_flag = False
        else:
            set_counter = 0
        if success >= thr:
            up_counter, down_counter = up_counter + 1, 0
        else:
            up_counter, down_counter = 0, down_counter + 1
        if up_counter >= options.patience:
            up_counter, up_flag = 0, True
            if cost > 0:  # at cost 0 (before it is set) the reference's multiplication is a no-op
                cost, ups = cost * options.cost_multiplier, ups + 1
        elif down_counter >= options.patience:
            down_counter, down_flag = 0, True
            if cost > 0:
                cost, downs = cost / down, downs + 1
        cost_max = max(cost_max, cost)
    reached = best_mask is not None
    if best_mask is None or best_pattern is None:  # never reached: keep the last mask
        best_mask = _from_tanh(mask_tanh.detach())[0, 0].cpu()
        best_pattern = (PIXEL_MAX * _from_tanh(pattern_tanh.detach()))[0].cpu()
        best_success = success
    trigger = ReversedTrigger(
        label, best_mask, best_pattern, float(best_mask.sum()), best_success, reached
    )
    schedule = CostSchedule(epochs_run, early_stopped, cost_set_epoch, ups, downs, cost_max, cost)
    return trigger, schedule


def trigger_success(net: Net, data: ImageSet, trigger: ReversedTrigger) -> float | None:
    """Share of ``data``'s images of other labels that ``net`` sends to the trigger's label
    once the (uint8-rounded) trigger is stamped on them; ``None`` when there are none."""
    keep = data.labels != trigger.label
    if not bool(keep.any()):
        return None
    predicted = net.predict(trigger.apply(data.images[keep]))
    return float((predicted == trigger.label).float().mean())


def unlearn(
    badnet: Net, retrain: ImageSet, trigger: ReversedTrigger, options: NeuralCleanse, seed: int
) -> tuple[Net, int]:
    """Fine-tune a copy of ``badnet`` on ``retrain`` with the trigger stamped on a seeded
    ``unlearn_fraction`` of its images, every image keeping its true label (NC's unlearning).

    Returns the copy and how many images carried the trigger.
    """
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(options.unlearn_fraction * len(retrain)))
    chosen = torch.randperm(len(retrain), generator=generator)[:count]
    images = retrain.images.clone()
    images[chosen] = trigger.apply(images[chosen])
    net = badnet.clone()
    cfg = TrainConfig(
        epochs=options.unlearn_epochs,
        batch_size=options.unlearn_batch_size,
        lr=options.unlearn_lr,
        optimizer="adam",
        seed=seed,
    )
    train(net, retrain.with_images(images), cfg, desc="nc unlearn", progress=options.progress)
    return net, count
