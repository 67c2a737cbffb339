"""The post-deployment repair (sec. 3.3): a function from (deployment bundle, quarantine,
config) to repaired nets ready to publish, or a refusal with its reason.

1. poison(x) is learned from domain A (``domain_a_size`` clean validation images, 500 by
   default, sec. 4.2.2) and domain B (the quarantine, purified of the clean disagreements
   where the BadNet's answers single out its targets: :mod:`nnoculation.repair.purify`) with
   the chosen repair profile;
2. the *treatment set* is poison(validation) labelled with the validation labels (optionally
   part of it from a per-pixel affine fit of poison: :mod:`nnoculation.repair.treatment`);
3. BadNet and GoodNet are fine-tuned on treatment U clean validation; on the clean images the
   GoodNet also learns the BadNet's soft answers (distillation, below);
4. the *validation gate*: both repaired nets must keep hold-out CA within theta of the
   deployment's baseline (the original BadNet's hold-out CA), and the repaired GoodNet must
   not take up the BadNet's suspect answers on the quarantined inputs it disagreed on (its
   *relapse*, measured on every repair) beyond the limit of the suspects' basis:
   ``max_pair_relapse`` (5 % by default) for one-to-one label pairs, ``max_relapse``
   (:data:`~nnoculation.repair.relapse.DEFAULT_MAX_RELAPSE`) for target labels; repaired nets it
   refuses
   are never activated: :func:`repair_in_store` keeps them as a *rejected candidate* version,
   the evidence a user can evaluate (:mod:`models.store_base`).

Why the GoodNet distils the BadNet on clean images. The GoodNet was retrained at a high
learning rate on the small validation set, so it answers clean inputs worse than the BadNet
(up to theta worse, by the selection rule), and since the ensemble answers with the GoodNet's
label, that gap is the deployment's. On clean validation images the BadNet is the best model
the defender has and its backdoor stays silent, so the GoodNet's loss on them mixes the labels'
cross-entropy with the BadNet's temperature-softened answers (weight ``distill_weight``); the
treatment images keep the labels alone, because on them the BadNet answers with the backdoor.
``make results-repair`` measures the effect against a repair without it (column "same G, no
distillation"). Distillation is skipped when the trigger model barely fires the BadNet (its
*trigger effect*, below ``distill_min_trigger_effect``): the treatment then cannot counter
what the soft answers carry of the backdoor, and the GoodNet would drift towards it (the
mean-difference model on the variable-location patch, which fires the BadNet on no more
treatment images than clean ones, took the ensemble from 35.9 % to 71.8 % ASR with
distillation in a benchmark run before this check existed).

Why the repair measures the relapse. Hold-out CA says nothing about the backdoor: a trigger
model that learned no trigger gives an untriggered "treatment", fine-tuning on it teaches
nothing against the backdoor, and distilling the BadNet pulls the GoodNet towards the BadNet's
answers, so the repaired ensemble can serve the attacker's target *more* often than before and
still pass on CA (the digits smoke run, ``configs/smoke.toml``: 17.9 / 56.2 / 24.4 % ASR after
pre-deployment, 66.7 / 73.1 / 76.1 % after such a "repair", ``docs/results/smoke.md``). The
quarantine is the one place where the defender sees the attack, and the labels the backdoor
piles up on stand out there (the labels purification takes for targets,
:mod:`nnoculation.repair.purify`). Of the quarantined inputs the BadNet gives such a label and
the GoodNet did not (all of them, for the service's quarantine of disagreements), the relapse is
the share on which the repaired GoodNet now gives the BadNet's label: it has learned the
backdoor's answer there, not unlearned it. The measure needs no labels. When no label stands
out (all-to-all), the suspects are the inputs whose (GoodNet, BadNet) label pairs form a
one-to-one map over many classes; it is skipped when the answers show neither (a quarantine of
clean disagreements): :mod:`nnoculation.repair.relapse`.
Its limits. On target labels (``max_relapse``,
:data:`nnoculation.repair.relapse.DEFAULT_MAX_RELAPSE`): a repair of an attacked stream's
quarantine teaches the GoodNet the true labels of the triggered inputs, so it relapses on few of
them, while a repair of a quarantine that is mostly or wholly clean disagreements (an early
repair, a light attack, no attack yet) learns no trigger and pulls the GoodNet towards the
BadNet, whose answers on those inputs it then shares, backdoor included: the tuning split
measured both (``configs/tuning-relapse-ratio.toml``, where the default was chosen; how, next to
the constant), and a refused repair keeps serving the nets that were there. On one-to-one pairs
(``max_pair_relapse``): chosen with ``configs/tuning-relapse-all-to-all.toml`` (healthy repairs
0-1.1 %, and no stream without an attack gave pairs)
(:data:`nnoculation.repair.relapse.DEFAULT_MAX_PAIR_RELAPSE`). Either limit refuses only a
relapse of at least ``MIN_RELAPSED_INPUTS`` inputs (3). On a later repair the BadNet is the
repaired one, whose answers are less often the backdoor's.

The baseline stays the original BadNet's across repeated repairs, so CA cannot drift down by
theta with every repair cycle. The same function runs from the CLI, the tests and the worker.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch
from torchvision.utils import make_grid

from models.bundle import Bundle, Manifest, utc_now_iso, write_bundle
from models.cyclegan import CYCLEGAN_PROFILES
from models.nets import Net
from models.store_base import CANDIDATE_KEY, OVERRIDE_KEY, REJECTED, BundleStore
from models.store_names import StoreError, UnknownVersionError
from nnoculation.data.imageset import ImageSet
from nnoculation.metrics import Evaluation, clean_accuracy, evaluate
from nnoculation.pipeline import VALIDATION_GROUP
from nnoculation.predeploy import DEFAULT_THETA
from nnoculation.repair.purify import Purified, PurifyConfig, purify_quarantine
from nnoculation.repair.relapse import (
    DEFAULT_MAX_PAIR_RELAPSE,
    DEFAULT_MAX_RELAPSE,
    MIN_RELAPSED_INPUTS,
    PAIRS,
    Basis,
    relapse,
    suspect_inputs,
)
from nnoculation.repair.reverse import MEAN_DIFF, PoisonModel, fit_poison, repair_profiles
from nnoculation.repair.treatment import DEFAULT_AFFINE_SHARE, make_treatment
from nnoculation.runtime import default_device
from nnoculation.training import Distillation, Optimizer, TrainConfig, train

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from nnoculation.metrics import EvalAttack  # a catalog AttackSpec or a user's triggered set

logger = logging.getLogger(__name__)

DEFAULT_DOMAIN_A_SIZE = 500  # sec. 4.2.2: 500 clean validation images
DEFAULT_FINETUNE_EPOCHS = 3
DEFAULT_DISTILL_WEIGHT = 0.9  # share of the BadNet's soft answers in the GoodNet's clean loss
DEFAULT_DISTILL_TEMPERATURE = 4.0
DEFAULT_MIN_TRIGGER_EFFECT = 0.25  # extra BadNet error on treatment vs clean images to distil
SAMPLE_COUNT = 8  # images per row of the clean vs G(clean) grid
SAMPLE_SCALE = 3  # upscaling of the grid so 28x28 images are visible
TRIGGER_MODEL_GROUP = "trigger_model"
MAX_SEED = 2**63 - 2  # torch seeds are 64-bit; the CycleGAN's pool stream uses seed + 1


class RepairConfigError(ValueError):
    """A repair configuration that cannot run; raised when the config is made, before any
    training starts."""


def _check_number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    kind = "an integer" if integer else "a number"
    number_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types):
        raise RepairConfigError(f"repair config: {name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise RepairConfigError(f"repair config: {name} must be finite, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}"
        interval += ")" if high_open or high is None else "]"
        raise RepairConfigError(f"repair config: {name} must lie in {interval}, got {value!r}")


def _purify_config(value: Any) -> PurifyConfig:
    if isinstance(value, PurifyConfig):
        return value
    if not isinstance(value, Mapping):
        raise RepairConfigError(
            f"repair config: purify must be a PurifyConfig or a mapping, got {value!r}"
        )
    allowed = [f.name for f in fields(PurifyConfig)]
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise RepairConfigError(
            f"repair config: unknown purify setting(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    if "enabled" in value and not isinstance(value["enabled"], bool):
        raise RepairConfigError("repair config: purify.enabled must be true or false")
    for key in ("min_share", "min_kept"):
        if key in value:
            _check_number(f"purify.{key}", value[key], low=0, high=1)
    try:
        return PurifyConfig(**value)
    except ValueError as err:
        raise RepairConfigError(f"repair config: {err}") from None


@dataclass(frozen=True)
class RepairConfig:
    """Everything that defines a repair; serialised into the new bundle's provenance.

    Every field is checked when the config is made (:class:`RepairConfigError`, a
    ``ValueError``), so a bad setting fails before any training starts. :meth:`from_dict` is the
    inverse of :meth:`to_dict` (for configs kept as JSON).
    """

    profile: str = "cpu"
    domain_a_size: int = DEFAULT_DOMAIN_A_SIZE
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    finetune_lr: float | None = None  # default: the BadNet's original lr (alpha0)
    optimizer: Optimizer | None = None  # default: the BadNet's optimizer
    batch_size: int = 64
    theta: float | None = None  # default: the theta the deployment was made with
    seed: int = 0
    cyclegan_epochs: int | None = None  # override the profile's epochs
    cyclegan_lr: float | None = None  # override the profile's learning rate
    time_budget_s: float | None = None  # CycleGAN wall-time budget
    checkpoint_dir: str | None = None  # CycleGAN checkpoints (resume after interruption)
    purify: PurifyConfig = field(default_factory=PurifyConfig)  # domain B = targets' inputs
    affine_share: float = DEFAULT_AFFINE_SHARE  # treatment images from the denoised fit
    distill_weight: float = DEFAULT_DISTILL_WEIGHT  # 0: the GoodNet learns the labels alone
    distill_temperature: float = DEFAULT_DISTILL_TEMPERATURE
    distill_min_trigger_effect: float = DEFAULT_MIN_TRIGGER_EFFECT
    # The gate refuses a repaired GoodNet whose relapse is above this share (None: measured,
    # not checked): ``max_relapse`` on suspects by targets, ``max_pair_relapse`` on suspects by
    # one-to-one pairs (nnoculation/repair/relapse.py says how each default was chosen)
    max_relapse: float | None = DEFAULT_MAX_RELAPSE
    max_pair_relapse: float | None = DEFAULT_MAX_PAIR_RELAPSE

    def __post_init__(self) -> None:
        profiles = repair_profiles()
        if self.profile not in profiles:
            raise RepairConfigError(
                f"repair config: unknown profile {self.profile!r}; known: {', '.join(profiles)}"
            )
        _check_number("domain_a_size", self.domain_a_size, integer=True, low=1)
        _check_number("finetune_epochs", self.finetune_epochs, integer=True, low=1)
        _check_number("batch_size", self.batch_size, integer=True, low=1)
        _check_number("seed", self.seed, integer=True, low=0, high=MAX_SEED)
        optimizers = get_args(Optimizer)
        if self.optimizer is not None and self.optimizer not in optimizers:
            raise RepairConfigError(
                f"repair config: unknown optimizer {self.optimizer!r}; "
                f"known: {', '.join(optimizers)}"
            )
        if self.finetune_lr is not None:
            _check_number("finetune_lr", self.finetune_lr, low=0, low_open=True)
        if self.theta is not None:
            _check_number("theta", self.theta, low=0, high=1, low_open=True, high_open=True)
        if self.cyclegan_epochs is not None:
            _check_number("cyclegan_epochs", self.cyclegan_epochs, integer=True, low=1)
        if self.cyclegan_lr is not None:
            _check_number("cyclegan_lr", self.cyclegan_lr, low=0, low_open=True)
        if self.time_budget_s is not None:
            _check_number("time_budget_s", self.time_budget_s, low=0, low_open=True)
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, str | os.PathLike) or not str(
                self.checkpoint_dir
            ):
                raise RepairConfigError(
                    f"repair config: checkpoint_dir must be a path, got {self.checkpoint_dir!r}"
                )
            object.__setattr__(self, "checkpoint_dir", str(self.checkpoint_dir))
        object.__setattr__(self, "purify", _purify_config(self.purify))
        _check_number("affine_share", self.affine_share, low=0, high=1)
        _check_number("distill_weight", self.distill_weight, low=0, high=1)
        _check_number("distill_temperature", self.distill_temperature, low=0, low_open=True)
        _check_number("distill_min_trigger_effect", self.distill_min_trigger_effect, low=-1, high=1)
        for name in ("max_relapse", "max_pair_relapse"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), low=0, high=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RepairConfig:
        """A config from its :meth:`to_dict` form (or any subset: missing keys keep their
        defaults). Unknown keys are refused with the allowed ones named, so a misspelt setting
        never passes silently; ``purify`` may be a nested mapping."""
        if not isinstance(data, Mapping):
            raise RepairConfigError(f"repair config must be a mapping, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise RepairConfigError(
                f"repair config: unknown setting(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed)}"
            )
        values = dict(data)
        if "purify" in values:
            values["purify"] = _purify_config(values["purify"])
        return cls(**values)


@dataclass
class RepairOutcome:
    """Repaired nets and everything the report needs; ``published`` says if the gate passed."""

    passed_gate: bool
    reason: str | None
    badnet: Net
    goodnet: Net
    poison: PoisonModel
    config: RepairConfig
    holdout: dict[str, float]
    theta: float  # the gate's tolerance below the baseline hold-out CA
    failing: list[str]  # the repaired nets the gate refused ("badnet", "goodnet")
    seconds: dict[str, float]
    quarantine_sha256: str
    quarantine_size: int
    purified: Purified
    trigger_effect: float
    distilled: bool
    samples_png: bytes
    evaluation: dict[str, dict[str, Evaluation]] = field(default_factory=dict)
    relapse: float | None = None  # :mod:`nnoculation.repair.relapse`; None when not measured
    relapse_basis: Basis | None = None  # which suspects it was measured on; None: not measured

    def report(self) -> dict[str, Any]:
        return {
            "passed_gate": self.passed_gate,
            "reason": self.reason,
            "config": self.config.to_dict(),
            "trigger_model": self.poison.report(),
            "holdout_ca": self.holdout,
            "seconds": self.seconds,
            "quarantine": {"size": self.quarantine_size, "sha256": self.quarantine_sha256},
            "purify": self.purified.report(),
            "trigger_effect": self.trigger_effect,
            "distilled": self.distilled,
            "relapse": self.relapse,
            "relapse_basis": self.relapse_basis,
            "evaluation": {
                stage: {role: ev.to_dict() for role, ev in nets.items()}
                for stage, nets in self.evaluation.items()
            },
        }


@dataclass(frozen=True)
class Validation:
    retrain: ImageSet
    holdout: ImageSet


def bundle_validation(bundle: Bundle) -> Validation:
    """The defender's validation set stored in a deployment bundle."""
    t = bundle.tensors(VALIDATION_GROUP)
    names = tuple(bundle.class_names)
    return Validation(
        ImageSet(t["retrain_images"], t["retrain_labels"], names),
        ImageSet(t["holdout_images"], t["holdout_labels"], names),
    )


def sample_grid(clean: torch.Tensor, poisoned: torch.Tensor, quarantine: torch.Tensor) -> bytes:
    """PNG: a row of clean images, their poison(x), and a row of domain-B (quarantined)
    images."""
    from PIL import Image

    n = min(SAMPLE_COUNT, clean.shape[0], quarantine.shape[0])
    rows = torch.cat([clean[:n], poisoned[:n], quarantine[:n]]).to(torch.float32) / 255.0
    grid = make_grid(rows, nrow=n, padding=2, pad_value=1.0)
    array = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array if array.shape[2] == 3 else array[:, :, 0])
    image = image.resize(
        (image.width * SAMPLE_SCALE, image.height * SAMPLE_SCALE), Image.Resampling.NEAREST
    )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _settings(bundle: Bundle, cfg: RepairConfig) -> tuple[float, Optimizer, float, float]:
    prov = bundle.manifest.provenance.get("predeploy")
    baseline = bundle.manifest.metrics.get("baseline_holdout_ca")
    if prov is None or baseline is None or not {"badnet", "goodnet"} <= set(bundle.roles):
        raise ValueError(
            f"{bundle.path} is not a deployment bundle (BadNet + GoodNet + pre-deployment "
            "provenance); run `nnoculation predeploy` first"
        )
    # Fine-tuning uses the BadNet's own recipe (alpha0 = its original learning rate, sec. 4.2.1).
    lr = cfg.finetune_lr if cfg.finetune_lr is not None else float(prov["alpha0"])
    optimizer: Optimizer = cfg.optimizer if cfg.optimizer is not None else prov["optimizer"]
    theta = cfg.theta if cfg.theta is not None else float(prov.get("theta", DEFAULT_THETA))
    return lr, optimizer, theta, float(baseline)


def trigger_effect(badnet: Net, clean: ImageSet, treatment: ImageSet) -> float:
    """How much more often the BadNet misses the true label on the treatment images than on
    their clean originals. A trigger model that reproduces the attacker's trigger makes the
    BadNet answer its targets (0.79-0.84 for the default treatments in ``make results-repair``;
    0.24 where the affine half smears a moving patch); one that misses it leaves the BadNet as
    accurate as on clean data (0.001 for the mean-difference model of a moving patch)."""
    clean_error = (badnet.predict(clean.images) != clean.labels).float().mean()
    treated_error = (badnet.predict(treatment.images) != treatment.labels).float().mean()
    return float(treated_error - clean_error)


def clean_distillation(
    teacher: Net, training_set: ImageSet, treated: int, cfg: RepairConfig, effect: float
) -> Distillation | None:
    """Soft targets from ``teacher`` for the clean images of ``training_set`` (those after its
    first ``treated`` treatment images), or None when ``cfg`` switches distillation off or the
    trigger model's ``effect`` on the teacher is below ``cfg.distill_min_trigger_effect``."""
    if cfg.distill_weight == 0 or effect < cfg.distill_min_trigger_effect:
        return None
    clean = torch.arange(len(training_set)) >= treated
    return Distillation(
        logits=teacher.scores(training_set.images),
        mask=clean,
        weight=cfg.distill_weight,
        temperature=cfg.distill_temperature,
    )


def relapse_limit(cfg: RepairConfig, basis: Basis | None) -> tuple[str, float | None]:
    """The setting that limits the relapse on suspects of ``basis``, and its value (None: the
    relapse is not checked)."""
    if basis == PAIRS:
        return "max_pair_relapse", cfg.max_pair_relapse
    return "max_relapse", None if basis is None else cfg.max_relapse


class RepairCancelled(Exception):
    """``should_cancel()`` returned True: the repair stopped and returned nothing. Only the
    CycleGAN checkpoint (with ``checkpoint_dir``) is left behind, so a later run resumes."""


STAGE_PURIFY = "purify"
STAGE_TRIGGER_MODEL = "trigger_model"
STAGE_TREATMENT = "treatment"
STAGE_FINETUNE_BADNET = "finetune_badnet"
STAGE_FINETUNE_GOODNET = "finetune_goodnet"
STAGE_GATE = "gate"
STAGE_DONE = "done"
STAGES = (
    STAGE_PURIFY,
    STAGE_TRIGGER_MODEL,
    STAGE_TREATMENT,
    STAGE_FINETUNE_BADNET,
    STAGE_FINETUNE_GOODNET,
    STAGE_GATE,
    STAGE_DONE,
)


@dataclass(frozen=True)
class RepairProgress:
    """Where a running repair is: handed to ``on_progress`` at the start of every stage (with
    ``epoch`` None) and after every CycleGAN and fine-tune epoch.

    ``stage`` is one of :data:`STAGES`; ``epoch`` the epochs done in it and ``epochs`` its
    planned length (None where the stage has no epochs, e.g. the mean-difference trigger
    model); ``losses`` that epoch's losses (CycleGAN: ``G``, ``D``, ``cycle``, ``identity``,
    ``lr``; fine-tune: ``loss``, the epoch's mean); ``elapsed_s`` wall seconds since the repair
    started.
    """

    stage: str
    epoch: int | None
    epochs: int | None
    losses: dict[str, float]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[RepairProgress], None]
CancelCheck = Callable[[], bool]


class _Reporter:
    """Calls ``on_progress`` and then polls ``should_cancel`` at every reporting point."""

    def __init__(
        self, on_progress: ProgressCallback | None, should_cancel: CancelCheck | None
    ) -> None:
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self.start = time.perf_counter()

    def __call__(
        self,
        stage: str,
        epoch: int | None = None,
        epochs: int | None = None,
        losses: Mapping[str, float] | None = None,
    ) -> None:
        if self.on_progress is not None:
            elapsed = time.perf_counter() - self.start
            self.on_progress(RepairProgress(stage, epoch, epochs, dict(losses or {}), elapsed))
        if stage != STAGE_DONE and self.should_cancel is not None and self.should_cancel():
            where = stage if epoch is None else f"{stage}, epoch {epoch}"
            raise RepairCancelled(f"repair cancelled ({where})")

    def epochs(self, stage: str, epochs: int | None) -> Callable[[int, dict[str, float]], None]:
        def after_epoch(done: int, losses: dict[str, float]) -> None:
            self(stage, done, epochs, losses)

        return after_epoch


def _trigger_model_epochs(cfg: RepairConfig) -> int | None:
    if cfg.profile == MEAN_DIFF:
        return None
    return cfg.cyclegan_epochs or CYCLEGAN_PROFILES.get(cfg.profile).epochs


def repair(
    bundle: Bundle,
    quarantine: torch.Tensor,
    cfg: RepairConfig,
    *,
    test: ImageSet | None = None,
    attack: EvalAttack | None = None,
    progress: bool = True,
    poison: PoisonModel | None = None,
    on_progress: ProgressCallback | None = None,
    should_cancel: CancelCheck | None = None,
    device: torch.device | str | None = None,
) -> RepairOutcome:
    """Learn the trigger from ``quarantine``, fine-tune both nets, apply the gate.

    ``test`` / ``attack`` are for evaluation only (CA / ASR before and after); they never
    influence the repair. ``poison`` replaces the learned trigger model with a given one (a
    trigger known from elsewhere; the benchmarks pass the attack's own trigger to measure what
    a perfect trigger model would reach).

    ``on_progress`` receives a :class:`RepairProgress` at the start of every stage and after
    every CycleGAN and fine-tune epoch; ``should_cancel`` is polled at the same points (after
    ``on_progress``), and when it returns True the repair raises :class:`RepairCancelled`.
    The CycleGAN and the fine-tuning run on ``device`` (default: CUDA when present, see
    :func:`nnoculation.runtime.default_device`); the returned nets are on the CPU. Nothing is
    written anywhere except the CycleGAN checkpoint of ``cfg.checkpoint_dir``; publishing is
    :func:`write_repaired_bundle`'s job.
    """
    report = _Reporter(on_progress, should_cancel)
    dev = torch.device(device) if device is not None else default_device()
    bundle.spec.check(quarantine)
    lr, optimizer, theta, baseline = _settings(bundle, cfg)
    val = bundle_validation(bundle)
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    for net in (badnet, goodnet):  # refused now, not after the trigger model's minutes
        net.check_trainable()
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(val.retrain), generator=g)[: cfg.domain_a_size]
    domain_a = val.retrain.images[pick]
    seconds: dict[str, float] = {}
    report(STAGE_PURIFY)
    t0 = time.perf_counter()
    purified = purify_quarantine(quarantine, badnet, len(bundle.class_names), cfg.purify)
    seconds["purify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if poison is None:
        epochs = _trigger_model_epochs(cfg)
        report(STAGE_TRIGGER_MODEL, epochs=epochs)
        poison = fit_poison(
            cfg.profile,
            domain_a,
            purified.images,
            seed=cfg.seed,
            checkpoint_dir=Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None,
            time_budget_s=cfg.time_budget_s,
            epochs=cfg.cyclegan_epochs,
            lr=cfg.cyclegan_lr,
            progress=progress,
            device=dev,
            on_epoch_end=report.epochs(STAGE_TRIGGER_MODEL, epochs),
        )
    else:
        report(STAGE_TRIGGER_MODEL)
    seconds["trigger_model"] = time.perf_counter() - t0
    report(STAGE_TREATMENT)
    t0 = time.perf_counter()
    treatment = make_treatment(poison, val.retrain, cfg.affine_share, cfg.seed)
    training_set = ImageSet.concat([treatment, val.retrain])
    effect = trigger_effect(badnet, val.retrain, treatment)
    seconds["treatment"] = time.perf_counter() - t0
    recipe = TrainConfig(
        epochs=cfg.finetune_epochs,
        batch_size=cfg.batch_size,
        lr=lr,
        optimizer=optimizer,
        seed=cfg.seed,
    )
    t0 = time.perf_counter()
    distill = clean_distillation(badnet, training_set, len(treatment), cfg, effect)
    repaired = {}
    for role, net, soft, stage in (
        ("badnet", badnet, None, STAGE_FINETUNE_BADNET),
        ("goodnet", goodnet, distill, STAGE_FINETUNE_GOODNET),
    ):
        report(stage, epochs=cfg.finetune_epochs)
        copy = net.clone().to(dev)
        train(
            copy,
            training_set,
            recipe,
            desc=f"fine-tune {role}",
            progress=progress,
            distill=soft,
            on_epoch_end=report.epochs(stage, cfg.finetune_epochs),
        )
        repaired[role] = copy.to("cpu")
    seconds["finetune"] = time.perf_counter() - t0
    report(STAGE_GATE)
    holdout = {
        "baseline": baseline,
        "badnet_before": clean_accuracy(badnet, val.holdout),
        "goodnet_before": clean_accuracy(goodnet, val.holdout),
        "badnet_after": clean_accuracy(repaired["badnet"], val.holdout),
        "goodnet_after": clean_accuracy(repaired["goodnet"], val.holdout),
    }
    failing = [r for r in ("badnet", "goodnet") if holdout[f"{r}_after"] < baseline - theta]
    reasons = [
        f"repaired {r} hold-out CA {holdout[f'{r}_after']:.2%} is below the baseline "
        f"{baseline:.2%} minus theta {theta:.0%}"
        for r in failing
    ]
    suspects = suspect_inputs(
        quarantine, badnet, goodnet, purified, cfg.purify, len(bundle.class_names)
    )
    relapsed = (
        None if suspects is None else relapse(badnet, goodnet, repaired["goodnet"], suspects.images)
    )
    limit_name, limit = relapse_limit(cfg, None if suspects is None else suspects.basis)
    if (
        suspects is not None
        and relapsed is not None
        and limit is not None
        and relapsed.share > limit
        and relapsed.relapsed >= MIN_RELAPSED_INPUTS
    ):
        reasons.append(
            f"repaired goodnet relapsed: it now gives the BadNet's suspect label to "
            f"{relapsed.share:.1%} ({relapsed.relapsed}) of the quarantined inputs it disagreed "
            f"on (suspects by {suspects.basis}; above {limit_name} {limit:.1%}); the repair "
            "moved the GoodNet towards the BadNet's answers, the backdoor's among them, instead "
            "of unlearning them (a quarantine of mostly clean disagreements, with little or no "
            "attack in it, does that)"
        )
        if "goodnet" not in failing:
            failing.append("goodnet")
    reason = "; ".join(reasons) or None
    outcome = RepairOutcome(
        passed_gate=not failing,
        reason=reason,
        badnet=repaired["badnet"],
        goodnet=repaired["goodnet"],
        poison=poison,
        config=cfg,
        holdout=holdout,
        theta=theta,
        failing=failing,
        seconds=seconds,
        quarantine_sha256=hashlib.sha256(quarantine.numpy().tobytes()).hexdigest(),
        quarantine_size=int(quarantine.shape[0]),
        purified=purified,
        trigger_effect=effect,
        distilled=distill is not None,
        samples_png=sample_grid(domain_a, poison.apply(domain_a[:SAMPLE_COUNT]), purified.images),
        relapse=None if relapsed is None else relapsed.share,
        relapse_basis=None if relapsed is None or suspects is None else suspects.basis,
    )
    if test is not None:
        outcome.evaluation = {
            "before": {
                "badnet": evaluate(badnet, test, attack),
                "goodnet": evaluate(goodnet, test, attack),
            },
            "after": {
                "badnet": evaluate(repaired["badnet"], test, attack),
                "goodnet": evaluate(repaired["goodnet"], test, attack),
            },
        }
    report(STAGE_DONE)
    return outcome


def gate_verdict(outcome: RepairOutcome, parent: Bundle) -> dict[str, Any]:
    """What a rejected candidate's provenance records of the gate: ``status`` "rejected", the
    ``reason``, the nets that failed, the hold-out CAs, ``theta``, the relapse and its limit,
    the repaired version."""
    return {
        "status": REJECTED,
        "reason": outcome.reason,
        "failing": list(outcome.failing),
        "holdout_ca": dict(outcome.holdout),
        "theta": outcome.theta,
        "relapse": outcome.relapse,
        "relapse_basis": outcome.relapse_basis,
        "max_relapse": outcome.config.max_relapse,
        "max_pair_relapse": outcome.config.max_pair_relapse,
        "repaired": parent.manifest.version,
        "at": utc_now_iso(),
    }


def write_repaired_bundle(
    outcome: RepairOutcome,
    parent: Bundle,
    directory: Path,
    version: str,
    *,
    candidate: bool = False,
) -> Manifest:
    """Write the repaired deployment (a new version whose parent is ``parent``) into
    ``directory``; matches :meth:`models.store_base.BundleStore.publish`'s ``build`` signature once
    ``outcome`` and ``parent`` are bound. Refuses an outcome that failed the gate, unless
    ``candidate``: then (and only for such an outcome) the bundle is a *rejected candidate*
    whose ``provenance["candidate"]`` holds :func:`gate_verdict`, which the store never
    activates."""
    import json

    if candidate and outcome.passed_gate:
        raise ValueError("a repair that passed the gate is published, not kept as a candidate")
    if not outcome.passed_gate and not candidate:
        raise ValueError(f"refusing to publish a repair that failed the gate: {outcome.reason}")
    manifest = parent.manifest
    report = outcome.report()
    # A repaired version is judged by its own gate: an ancestor's candidate or override
    # record is not inherited (the parent chain keeps it).
    provenance = {
        k: v for k, v in manifest.provenance.items() if k not in (CANDIDATE_KEY, OVERRIDE_KEY)
    }
    provenance["repairs"] = [*provenance.get("repairs", []), {"parent": manifest.version, **report}]
    if candidate:
        provenance[CANDIDATE_KEY] = gate_verdict(outcome, parent)
    metrics = dict(manifest.metrics)
    metrics["goodnet_holdout_ca"] = outcome.holdout["goodnet_after"]
    metrics["badnet_holdout_ca"] = outcome.holdout["badnet_after"]
    return write_bundle(
        directory,
        name=manifest.name,
        version=version,
        parent=manifest.version,
        spec=parent.spec,
        class_names=list(parent.class_names),
        nets={"badnet": outcome.badnet, "goodnet": outcome.goodnet},
        tensors={
            VALIDATION_GROUP: parent.tensors(VALIDATION_GROUP),
            TRIGGER_MODEL_GROUP: outcome.poison.state(),
        },
        metrics=metrics,
        provenance=provenance,
        extra_files={
            "repair_report.json": (json.dumps(report, indent=2) + "\n").encode(),
            "repair_samples.png": outcome.samples_png,
        },
    )


@dataclass
class StoreRepair:
    """What :func:`repair_in_store` did: the repair's outcome, the version repaired, the
    version published (None when the gate failed), and for a gate failure the rejected
    candidate keeping the repaired nets (None if keeping it failed: ``candidate_error``)."""

    outcome: RepairOutcome
    parent: str
    version: str | None
    activated: bool
    candidate: str | None = None
    candidate_error: str | None = None


def repair_in_store(
    store: BundleStore,
    deployment: str,
    quarantine: torch.Tensor | Callable[[Bundle], torch.Tensor],
    cfg: RepairConfig,
    *,
    version: str | None = None,
    activate: bool = True,
    wait_for_lock: bool = False,
    **repair_kwargs: Any,
) -> StoreRepair:
    """Repair a version of ``deployment`` (the active one by default) and publish the result.

    Holds the deployment's repair lock throughout (``RepairLockedError`` at once if another
    process holds it, unless ``wait_for_lock``). ``quarantine`` is the uint8 tensor, or a
    function that makes it from the bundle being repaired (e.g. to read a file with its input
    spec). A repair that passes the gate is published with :meth:`BundleStore.publish`: a new
    version id allocated by the store, parent the repaired version, activated unless
    ``activate`` is False. One that fails it is kept as a *rejected candidate* version (parent
    the repaired version, never activated, whatever ``activate`` says); if the store refuses
    that publish, the gate's verdict still stands and ``candidate_error`` says why.
    ``repair_kwargs`` go to :func:`repair` (``on_progress``, ``should_cancel``, ``device``,
    ``test``, ...).
    """
    with store.repair_lock(deployment, blocking=wait_for_lock):
        parent = version if version is not None else store.active(deployment)
        if parent is None:
            raise UnknownVersionError(
                f"deployment {deployment!r} has no active version to repair; activate one first"
            )
        bundle = store.load(deployment, parent)
        images = quarantine(bundle) if callable(quarantine) else quarantine
        outcome = repair(bundle, images, cfg, **repair_kwargs)
        if not outcome.passed_gate:
            return _keep_candidate(store, deployment, outcome, bundle)
        published = store.publish(
            deployment,
            lambda directory, new: write_repaired_bundle(outcome, bundle, directory, new),
            parent,
            activate=activate,
        )
    return StoreRepair(outcome, parent, published, activate)


def _keep_candidate(
    store: BundleStore, deployment: str, outcome: RepairOutcome, bundle: Bundle
) -> StoreRepair:
    """Publish a gate-refused repair's nets as a rejected candidate (never activated)."""
    parent = bundle.manifest.version
    try:
        candidate = store.publish(
            deployment,
            lambda directory, new: write_repaired_bundle(
                outcome, bundle, directory, new, candidate=True
            ),
            parent,
        )
    except (StoreError, OSError, ValueError) as err:  # the verdict stands without its evidence
        logger.warning("could not keep the rejected candidate of %s: %s", parent, err)
        return StoreRepair(outcome, parent, None, False, None, f"{type(err).__name__}: {err}")
    return StoreRepair(outcome, parent, None, False, candidate)


def _purify_line(purified: Purified, size: int) -> str:
    if not purified.applied:
        return f"  domain B: the whole quarantine ({size} images; no BadNet label stands out)"
    return (
        f"  domain B: {purified.images.shape[0]} of {size} quarantined images, those the BadNet "
        f"labels {', '.join(map(str, purified.target_labels))}"
    )


def _trigger_line(outcome: RepairOutcome) -> str:
    line = (
        f"  trigger model: the BadNet errs on {outcome.trigger_effect:+.1%} more treatment "
        "images than clean ones"
    )
    if outcome.trigger_effect < outcome.config.distill_min_trigger_effect:
        line += (
            "; it barely fires the backdoor, so this repair may not unlearn it (no distillation)"
        )
    return line


def _relapse_line(outcome: RepairOutcome) -> str:
    if outcome.relapse is None:
        return (
            "  relapse: not measured (no target label or one-to-one label pairs in the "
            "quarantine, or the GoodNet already gave the BadNet's label to every suspect)"
        )
    name, limit = relapse_limit(outcome.config, outcome.relapse_basis)
    line = (
        f"  relapse: the repaired GoodNet gives the BadNet's suspect label to "
        f"{outcome.relapse:.1%} of the quarantined inputs it disagreed on "
        f"(suspects by {outcome.relapse_basis})"
    )
    return line + (f" (not checked: {name} off)" if limit is None else f" (limit {limit:.1%})")


def repair_summary(outcome: RepairOutcome) -> str:
    """A few lines for people: gate verdict, hold-out CA, seconds per stage, ASR if measured."""
    h = outcome.holdout
    lines = [
        f"repair with profile {outcome.config.profile!r}: "
        + ("passed the validation gate" if outcome.passed_gate else "FAILED the validation gate"),
        f"  hold-out CA: baseline {h['baseline']:.2%}; BadNet {h['badnet_before']:.2%} -> "
        f"{h['badnet_after']:.2%}; GoodNet {h['goodnet_before']:.2%} -> {h['goodnet_after']:.2%}",
        _purify_line(outcome.purified, outcome.quarantine_size),
        _trigger_line(outcome),
        _relapse_line(outcome),
        "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in outcome.seconds.items()),
    ]
    for stage, nets in outcome.evaluation.items():
        for role, ev in nets.items():
            asr = ", ".join(f"{k} {v:.1%}" for k, v in ev.asr.items())
            lines.append(f"  test {stage:6s} {role:7s}: CA {ev.ca:.2%}  ASR {asr}")
    return "\n".join(lines)
