"""Distillation in the repair's fine-tune: the loss, the training loop and the engine's
soft targets (the GoodNet learns the BadNet's answers on clean images only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.bundle import load_bundle
from models.nets import Net
from nnoculation.data.imageset import ImageSet
from nnoculation.repair.engine import (
    RepairConfig,
    bundle_validation,
    clean_distillation,
    repair,
    trigger_effect,
)
from nnoculation.repair.reverse import MEAN_DIFF, fit_poison
from nnoculation.training import Distillation, TrainConfig, train
from tests.conftest import NUM_CLASSES, synthetic_set
from tests.deployment_fixtures import make_deployment, triggered


def test_loss_mixes_labels_and_soft_targets_on_masked_rows_only() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    mask = torch.tensor([True, False, True, False, False, True])
    d = Distillation(logits=teacher, mask=mask, weight=0.75, temperature=3.0)
    ce = F.cross_entropy(student, labels, reduction="none")
    p_teacher = F.softmax(teacher / 3.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / 3.0, dim=1))).sum(1)
    expected = torch.where(mask, 0.25 * ce + 0.75 * 9.0 * kl, ce).mean()
    assert d.loss(student, labels, torch.arange(6)) == pytest.approx(float(expected), rel=1e-5)
    plain = Distillation(logits=teacher, mask=mask, weight=0.0, temperature=3.0)
    assert plain.loss(student, labels, torch.arange(6)) == pytest.approx(float(ce.mean()))


def test_the_loss_reads_the_teacher_rows_of_the_batch() -> None:
    teacher = torch.eye(4) * 20  # row i says "class i"
    every = torch.ones(4, dtype=torch.bool)
    d = Distillation(logits=teacher, mask=every, weight=1.0, temperature=1.0)
    student = torch.eye(4)[[2, 3]] * 20
    labels = torch.tensor([0, 0])  # ignored at weight 1
    assert d.loss(student, labels, torch.tensor([2, 3])) < 1e-3
    assert d.loss(student, labels, torch.tensor([0, 1])) > 10


@pytest.mark.parametrize("weight, follows_teacher", [(1.0, True), (0.0, False)])
def test_a_student_follows_the_teacher_on_distilled_images(
    tiny_net: Net, weight: float, follows_teacher: bool
) -> None:
    data = synthetic_set(160, seed=7)
    shifted = (data.labels + 1) % NUM_CLASSES  # the teacher's (wrong) answers
    teacher = F.one_hot(shifted, NUM_CLASSES).float() * 10
    mask = torch.ones(len(data), dtype=torch.bool)
    d = Distillation(logits=teacher, mask=mask, weight=weight, temperature=1.0)
    train(tiny_net, data, TrainConfig(epochs=15, lr=1e-2, seed=0), progress=False, distill=d)
    answers = tiny_net.predict(data.images)
    agree_teacher = float((answers == shifted).float().mean())
    agree_labels = float((answers == data.labels).float().mean())
    assert (agree_teacher > 0.9) if follows_teacher else (agree_labels > 0.9)


def test_bad_distillation_settings_are_refused(tiny_net: Net) -> None:
    logits, mask = torch.zeros(4, NUM_CLASSES), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="weight"):
        Distillation(logits, mask, weight=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(logits, mask, weight=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="one row per image"):
        Distillation(logits, mask[:3], weight=0.5, temperature=1.0)
    d = Distillation(logits, mask, weight=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="fixed training set"):
        train(tiny_net, synthetic_set(8, seed=1), TrainConfig(epochs=1), progress=False, distill=d)
    with pytest.raises(ValueError, match="fixed training set"):
        train(
            tiny_net,
            lambda epoch: synthetic_set(4, seed=epoch),
            TrainConfig(epochs=1),
            progress=False,
            distill=d,
        )


def test_engine_distils_the_teacher_on_the_clean_part_only(tiny_net: Net) -> None:
    treatment, clean = synthetic_set(12, seed=2), synthetic_set(20, seed=3)
    training_set = ImageSet.concat([treatment, clean])
    d = clean_distillation(tiny_net, training_set, len(treatment), RepairConfig(), effect=0.5)
    assert d is not None
    assert torch.equal(d.mask, torch.arange(32) >= 12)
    assert torch.allclose(d.logits, tiny_net.scores(training_set.images))
    assert (d.weight, d.temperature) == (
        RepairConfig.distill_weight,
        RepairConfig.distill_temperature,
    )
    off = RepairConfig(distill_weight=0.0)
    assert clean_distillation(tiny_net, training_set, len(treatment), off, effect=0.5) is None
    weak = RepairConfig.distill_min_trigger_effect - 0.01
    assert clean_distillation(tiny_net, training_set, len(treatment), RepairConfig(), weak) is None


def test_trigger_effect_is_the_badnets_extra_error_on_the_treatment(tiny_net: Net) -> None:
    clean = synthetic_set(40, seed=8)
    train(tiny_net, clean, TrainConfig(epochs=15, lr=1e-2, seed=0), progress=False)
    assert trigger_effect(tiny_net, clean, clean) == 0.0
    wrong = clean.with_images(clean.images.roll(1, dims=0))  # another class's image mostly
    expected = float(
        (tiny_net.predict(wrong.images) != wrong.labels).float().mean()
        - (tiny_net.predict(clean.images) != clean.labels).float().mean()
    )
    assert trigger_effect(tiny_net, clean, wrong) == pytest.approx(expected)
    assert expected > 0.5


def test_a_trigger_model_that_does_not_fire_the_badnet_turns_distillation_off(
    tiny_net: Net, tmp_path: Path
) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    bundle = load_bundle(path)
    quarantine = triggered(attack, synthetic_set(40, seed=21).images)
    val = bundle_validation(bundle)
    blind = fit_poison(MEAN_DIFF, val.retrain.images[:40], val.retrain.images[40:80])
    fires = fit_poison(MEAN_DIFF, val.retrain.images[:40], quarantine)
    outcomes = {
        name: repair(bundle, quarantine, RepairConfig(theta=0.99), progress=False, poison=p)
        for name, p in (("blind", blind), ("fires", fires))
    }
    assert outcomes["blind"].trigger_effect < RepairConfig.distill_min_trigger_effect
    assert not outcomes["blind"].distilled
    assert outcomes["fires"].trigger_effect >= RepairConfig.distill_min_trigger_effect
    assert outcomes["fires"].distilled
    report = outcomes["blind"].report()
    assert report["distilled"] is False and report["trigger_effect"] < 0.25
    # Distillation teaches the GoodNet only: the same repair without it gives the same
    # repaired BadNet and another repaired GoodNet.
    plain = repair(bundle, quarantine, RepairConfig(theta=0.99, distill_weight=0.0),
                   progress=False, poison=fires)  # fmt: skip
    assert not plain.distilled
    assert _same_weights(plain.badnet, outcomes["fires"].badnet)
    assert not _same_weights(plain.goodnet, outcomes["fires"].goodnet)


def test_scores_are_eval_mode_logits_and_restore_the_mode(tiny_net: Net) -> None:
    images = synthetic_set(10, seed=4).images
    tiny_net.module.classifier[3].p = 0.5  # dropout: train mode would give random logits
    tiny_net.train_mode(False)
    with torch.no_grad():
        expected = tiny_net.logits(images).float()
        tiny_net.train_mode(True)
        dropped = tiny_net.logits(images).float()
    assert not torch.allclose(dropped, expected)  # the mode shows in the logits
    scores = tiny_net.scores(images, batch_size=3)
    assert tiny_net.module.training  # restored
    assert scores.shape == (10, NUM_CLASSES) and not scores.requires_grad
    assert torch.allclose(scores, expected, atol=1e-6)  # eval mode, batch by batch
    assert torch.equal(tiny_net.scores(images, batch_size=3), scores)  # no dropout draws
    assert tiny_net.scores(images[:0]).shape == (0, NUM_CLASSES)


def _same_weights(a: Net, b: Net) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
