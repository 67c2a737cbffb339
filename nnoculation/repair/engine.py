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
   deployment's baseline (the original BadNet's hold-out CA), else nothing is published.

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

The baseline stays the original BadNet's across repeated repairs, so CA cannot drift down by
theta with every repair cycle. The same function runs from the CLI, the tests and the worker.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torchvision.utils import make_grid

from models.bundle import Bundle, Manifest, write_bundle
from models.nets import Net
from nnoculation.data.imageset import ImageSet
from nnoculation.metrics import Evaluation, clean_accuracy, evaluate
from nnoculation.pipeline import VALIDATION_GROUP
from nnoculation.predeploy import DEFAULT_THETA
from nnoculation.repair.purify import Purified, PurifyConfig, purify_quarantine
from nnoculation.repair.reverse import PoisonModel, fit_poison
from nnoculation.repair.treatment import DEFAULT_AFFINE_SHARE, make_treatment
from nnoculation.training import Distillation, Optimizer, TrainConfig, train

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from nnoculation.attacks import AttackSpec

DEFAULT_DOMAIN_A_SIZE = 500  # sec. 4.2.2: 500 clean validation images
DEFAULT_FINETUNE_EPOCHS = 3
DEFAULT_DISTILL_WEIGHT = 0.9  # share of the BadNet's soft answers in the GoodNet's clean loss
DEFAULT_DISTILL_TEMPERATURE = 4.0
DEFAULT_MIN_TRIGGER_EFFECT = 0.25  # extra BadNet error on treatment vs clean images to distil
SAMPLE_COUNT = 8  # images per row of the clean vs G(clean) grid
SAMPLE_SCALE = 3  # upscaling of the grid so 28x28 images are visible
TRIGGER_MODEL_GROUP = "trigger_model"


@dataclass(frozen=True)
class RepairConfig:
    """Everything that defines a repair; serialised into the new bundle's provenance."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    seconds: dict[str, float]
    quarantine_sha256: str
    quarantine_size: int
    purified: Purified
    trigger_effect: float
    distilled: bool
    samples_png: bytes
    evaluation: dict[str, dict[str, Evaluation]] = field(default_factory=dict)

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
    image = image.resize((image.width * SAMPLE_SCALE, image.height * SAMPLE_SCALE), Image.NEAREST)
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


def repair(
    bundle: Bundle,
    quarantine: torch.Tensor,
    cfg: RepairConfig,
    *,
    test: ImageSet | None = None,
    attack: AttackSpec | None = None,
    progress: bool = True,
    poison: PoisonModel | None = None,
) -> RepairOutcome:
    """Learn the trigger from ``quarantine``, fine-tune both nets, apply the gate.

    ``test`` / ``attack`` are for evaluation only (CA / ASR before and after); they never
    influence the repair. ``poison`` replaces the learned trigger model with a given one (a
    trigger known from elsewhere; the benchmarks pass the attack's own trigger to measure what
    a perfect trigger model would reach).
    """
    bundle.spec.check(quarantine)
    lr, optimizer, theta, baseline = _settings(bundle, cfg)
    val = bundle_validation(bundle)
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(val.retrain), generator=g)[: cfg.domain_a_size]
    domain_a = val.retrain.images[pick]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    purified = purify_quarantine(quarantine, badnet, len(bundle.class_names), cfg.purify)
    seconds["purify"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if poison is None:
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
        )
    seconds["trigger_model"] = time.perf_counter() - t0
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
    for role, net, soft in (("badnet", badnet, None), ("goodnet", goodnet, distill)):
        copy = net.clone()
        train(copy, training_set, recipe, desc=f"fine-tune {role}", progress=progress, distill=soft)
        repaired[role] = copy
    seconds["finetune"] = time.perf_counter() - t0
    holdout = {
        "baseline": baseline,
        "badnet_before": clean_accuracy(badnet, val.holdout),
        "goodnet_before": clean_accuracy(goodnet, val.holdout),
        "badnet_after": clean_accuracy(repaired["badnet"], val.holdout),
        "goodnet_after": clean_accuracy(repaired["goodnet"], val.holdout),
    }
    failing = [r for r in ("badnet", "goodnet") if holdout[f"{r}_after"] < baseline - theta]
    reason = None
    if failing:
        reason = "; ".join(
            f"repaired {r} hold-out CA {holdout[f'{r}_after']:.2%} is below the baseline "
            f"{baseline:.2%} minus theta {theta:.0%}"
            for r in failing
        )
    outcome = RepairOutcome(
        passed_gate=not failing,
        reason=reason,
        badnet=repaired["badnet"],
        goodnet=repaired["goodnet"],
        poison=poison,
        config=cfg,
        holdout=holdout,
        seconds=seconds,
        quarantine_sha256=hashlib.sha256(quarantine.numpy().tobytes()).hexdigest(),
        quarantine_size=int(quarantine.shape[0]),
        purified=purified,
        trigger_effect=effect,
        distilled=distill is not None,
        samples_png=sample_grid(domain_a, poison.apply(domain_a[:SAMPLE_COUNT]), purified.images),
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
    return outcome


def write_repaired_bundle(
    outcome: RepairOutcome, parent: Bundle, directory: Path, version: str
) -> Manifest:
    """Write the repaired deployment (a new version whose parent is ``parent``) into
    ``directory``; matches :meth:`models.store.ModelStore.publish`'s ``build`` signature once
    ``outcome`` and ``parent`` are bound. Refuses an outcome that failed the gate."""
    import json

    if not outcome.passed_gate:
        raise ValueError(f"refusing to publish a repair that failed the gate: {outcome.reason}")
    manifest = parent.manifest
    report = outcome.report()
    provenance = dict(manifest.provenance)
    provenance["repairs"] = [*provenance.get("repairs", []), {"parent": manifest.version, **report}]
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
        "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in outcome.seconds.items()),
    ]
    for stage, nets in outcome.evaluation.items():
        for role, ev in nets.items():
            asr = ", ".join(f"{k} {v:.1%}" for k, v in ev.asr.items())
            lines.append(f"  test {stage:6s} {role:7s}: CA {ev.ca:.2%}  ASR {asr}")
    return "\n".join(lines)
