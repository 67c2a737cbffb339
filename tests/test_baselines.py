"""Fine-Pruning and STRIP (issue 10, build item 4) on a tiny patch BadNet: each does what its
paper says, is found by name, and ``evaluate`` on STRIP's rejecting predictor gives the paper's
CA / ASR translation (a refused clean input is an error, a refused triggered one a failed
attack)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn

from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from nnoculation.attacks import AttackSpec
from nnoculation.data.imageset import ImageSet
from nnoculation.defenses import REJECTED, DefenseInputs, Rejecting, defense_names, get_defense
from nnoculation.defenses.fine_pruning import FinePruning, last_conv
from nnoculation.defenses.strip import StripDetector, strip_entropy, superimpose
from nnoculation.metrics import evaluate, triggered_sets
from nnoculation.training import train
from tests.conftest import NUM_CLASSES, SIDE, synthetic_set
from tests.deployment_fixtures import RECIPE, patch_attack

# STRIP's threshold is the 5 % quantile of HOLDOUT clean scores; the FRR is then measured on
# FRESH clean images it never saw. The true FRR of an empirical quantile of 400 scores has a
# standard deviation of sqrt(.05 * .95 / 400) = 1.1 points, and measuring it on 1,000 images
# adds 0.7: three of the combined 1.3 points is the slack.
HOLDOUT, FRESH = 400, 1000
FRR_SLACK = 0.04
# An obvious patch: the catalog's patch (4/28 of the side) is 2x2 on these 12x12 images and
# lies inside class 3's bright band, where the BadNet learns it only in part (and STRIP
# rightly cannot refuse triggers the net ignores); a 4x4 checkerboard of 2x2 cells is learnt.
OBVIOUS_PATCH = {"size": 4 / SIDE, "cells": 2}


@pytest.fixture(scope="module")
def badnet_setup() -> tuple[Net, AttackSpec, DefenseInputs, ImageSet]:
    """(trained patch BadNet, attack, defender's clean data, test images), trained once."""
    spec = InputSpec(1, SIDE, SIDE, (0.3,), (0.3,))
    torch.manual_seed(0)
    module = build_classifier("small_cnn", spec, NUM_CLASSES, width=4)
    badnet = Net(module, "zoo", spec, NUM_CLASSES, "small_cnn", {"width": 4})
    catalog = patch_attack()
    trigger = dataclasses.replace(catalog.triggers[0], params=OBVIOUS_PATCH)
    attack = dataclasses.replace(catalog, triggers=(trigger,))
    attacker = synthetic_set(600, seed=11)
    train(badnet, attack.poison_training_set(attacker, seed=0), RECIPE, progress=False)
    inputs = DefenseInputs(
        badnet, synthetic_set(400, seed=12), synthetic_set(HOLDOUT, seed=13), seed=0
    )
    return badnet, attack, inputs, synthetic_set(200, seed=14)


def _triggered(attack: AttackSpec, test: ImageSet) -> torch.Tensor:
    (trig,) = triggered_sets(attack, test)
    return trig.images


def test_both_baselines_are_registered_by_name() -> None:
    assert {"fine-pruning", "strip"} <= set(defense_names())
    assert get_defense("fine-pruning").name == "fine-pruning"
    assert get_defense("strip").name == "strip"
    with pytest.raises(ValueError, match="unknown defense"):
        get_defense("no-such-defense")


# ---------------------------------------------------------------- Fine-Pruning


def _channel_means(net: Net, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.clamp_min(0)))
    try:
        net.scores(images)
    finally:
        handle.remove()
    return torch.cat(seen).mean(dim=(0, 2, 3))


def test_fine_pruning_prunes_least_active_channels_and_keeps_ca_within_bound(
    badnet_setup: Any,
) -> None:
    badnet, _attack, inputs, _test = badnet_setup
    before = {k: v.clone() for k, v in badnet.module.state_dict().items()}
    defended = get_defense("fine-pruning", epochs=2, progress=False).run(inputs)
    d = defended.details
    floor = d["baseline_holdout_ca"] - d["max_ca_drop"]

    # It removed channels, and the ones it removed are the least active on clean retrain data.
    assert d["layer"] == "features.3" and d["channels"] == 8
    assert d["pruned_count"] >= 1
    means = _channel_means(badnet, badnet.module.features[3], inputs.retrain.images)
    kept = [c for c in range(d["channels"]) if c not in d["pruned"]]
    if kept:
        assert float(means[d["pruned"]].max()) <= float(means[kept].min()) + 1e-6

    # Every kept pruning step stayed within the bound, and it stopped at the bound (not before).
    kept_steps = d["ca_steps"][: d["pruned_count"] + 1]
    assert all(ca >= floor for ca in kept_steps)
    assert d["pruned_holdout_ca"] >= floor
    if d["pruned_count"] < d["channels"]:
        assert d["ca_steps"][-1] < floor

    # The pruned channels carry nothing in the defended net, even after fine-tuning.
    net = defended.predictor
    assert isinstance(net, Net)
    relu_in: list[torch.Tensor] = []
    net.module.features[4].register_forward_pre_hook(lambda m, a: relu_in.append(a[0].clone()))
    net.scores(inputs.holdout.images[:16])
    assert torch.all(relu_in[0][:, d["pruned"]] == 0)
    assert d["finetune"]["epochs"] == 2
    assert d["finetune"]["holdout_ca"] == pytest.approx(
        float((net.predict(inputs.holdout.images) == inputs.holdout.labels).float().mean())
    )
    # The BadNet handed in is untouched (no mask, same weights).
    assert not badnet.module.features[3]._forward_hooks
    for key, value in badnet.module.state_dict().items():
        assert torch.equal(value, before[key])


def test_fine_pruning_refuses_what_it_cannot_prune(badnet_setup: Any) -> None:
    badnet, _attack, inputs, _test = badnet_setup
    scripted = Net(torch.jit.script(badnet.clone().module), "torchscript", badnet.spec, NUM_CLASSES)
    with pytest.raises(ValueError, match="last convolutional layer"):
        FinePruning(progress=False).run(DefenseInputs(scripted, inputs.retrain, inputs.holdout))
    dense = Net(
        nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, NUM_CLASSES)),
        "zoo",
        badnet.spec,
        NUM_CLASSES,
        "small_cnn",
    )
    with pytest.raises(ValueError, match="no convolutional layer"):
        last_conv(dense)
    for bad in (
        {"max_ca_drop": 0.0},
        {"max_ca_drop": 1.5},
        {"epochs": -1},
        {"lr": 0.0},
        {"step": 0},
        {"optimizer": "rmsprop"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):  # the message names the option
            FinePruning(**bad)


# ---------------------------------------------------------------- STRIP


def test_superimpose_is_the_saturated_sum_or_the_average() -> None:
    a = torch.full((1, 1, 2, 2), 200, dtype=torch.uint8)
    b = torch.tensor([[[[100, 10], [0, 55]]]], dtype=torch.uint8).unsqueeze(0)
    assert superimpose(a, b).flatten().tolist() == [255, 210, 200, 255]
    assert superimpose(a, b, "average").flatten().tolist() == [150, 105, 100, 128]


class _Confident(nn.Module):
    """Logits: +/- ``scale`` depending on whether the mean pixel is above ``cut``."""

    def __init__(self, scale: float, cut: float) -> None:
        super().__init__()
        self.scale, self.cut = scale, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.mean(dim=(1, 2, 3)) > self.cut).float()
        logits = torch.zeros(x.shape[0], NUM_CLASSES)
        logits[:, 0] = self.scale * (2 * bright - 1)
        logits[:, 1] = -logits[:, 0]
        return logits


def test_strip_entropy_is_the_mean_of_each_superimposition_s_entropy() -> None:
    spec = InputSpec(1, SIDE, SIDE, (0.0,), (1.0,))
    pool = torch.randint(
        0, 256, (50, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    images = pool[:6]
    # A net without confidence: every superimposition has the entropy of the uniform, 2 bits.
    uniform = Net(_Confident(0.0, 0.5), "zoo", spec, NUM_CLASSES, "stub")
    assert torch.allclose(strip_entropy(uniform, images, pool, n=20), torch.full((6,), 2.0))
    # A confident net whose label flips from one superimposition to the next: each one's
    # entropy is ~0, so STRIP's score is ~0, although the *averaged* distribution is mixed.
    flipping = Net(_Confident(50.0, 0.83), "zoo", spec, NUM_CLASSES, "stub")
    labels = flipping.predict(superimpose(images[:1], pool[:20].unsqueeze(0)))
    assert 0 < int(labels.sum()) < 20  # it does flip
    assert torch.all(strip_entropy(flipping, images, pool, n=20) < 1e-6)
    # Seeded: the same call gives the same scores.
    net = Net(_Confident(1.0, 0.75), "zoo", spec, NUM_CLASSES, "stub")
    assert torch.equal(
        strip_entropy(net, images, pool, 20, seed=3), strip_entropy(net, images, pool, 20, seed=3)
    )
    with pytest.raises(ValueError, match="n must lie"):
        strip_entropy(net, images, pool, n=51)


@pytest.fixture(scope="module")
def strip_result(badnet_setup: Any) -> Any:
    _badnet, _attack, inputs, _test = badnet_setup
    return get_defense("strip", progress=False).run(inputs)


def test_strip_threshold_meets_its_frr_on_clean_data_it_did_not_see(strip_result: Any) -> None:
    d = strip_result.details
    assert d["n"] == 100 and d["frr_target"] == 0.05 and d["forward_passes_per_input"] == 100
    assert d["frr_on_threshold_data"] == pytest.approx(0.05, abs=1.5 / HOLDOUT)
    fresh = synthetic_set(FRESH, seed=21)
    refused = strip_result.predictor.predict(fresh.images) == REJECTED
    frr = float(refused.float().mean())
    assert frr <= 0.05 + FRR_SLACK, f"FRR {frr:.3f} on unseen clean images"


def test_strip_refuses_most_triggered_inputs(badnet_setup: Any, strip_result: Any) -> None:
    badnet, attack, _inputs, test = badnet_setup
    triggered = _triggered(attack, test)
    assert float((badnet.predict(triggered) == 0).float().mean()) > 0.9  # the backdoor works
    refused = strip_result.predictor.predict(triggered) == REJECTED
    assert float(refused.float().mean()) >= 0.8


def test_evaluate_on_strip_gives_the_ca_asr_translation(
    badnet_setup: Any, strip_result: Any
) -> None:
    badnet, attack, _inputs, test = badnet_setup
    predictor = strip_result.predictor
    assert isinstance(predictor, Rejecting)
    result = evaluate(predictor, test, attack)
    refused = predictor.refuse(test.images)
    assert 0 < int(refused.sum()) < len(test)  # some clean inputs are refused here
    correct = (badnet.predict(test.images) == test.labels) & ~refused
    assert result.ca == pytest.approx(float(correct.float().mean()))
    assert result.ca < evaluate(badnet, test).ca  # the refused clean inputs count as errors
    (trig,) = triggered_sets(attack, test)
    hits = (badnet.predict(trig.images) == trig.targets) & ~predictor.refuse(trig.images)
    assert result.asr["patch"] == pytest.approx(float(hits.float().mean()))
    # Refusing everything: no clean input is right and no attack succeeds.
    everything = Rejecting(badnet, lambda x: torch.ones(x.shape[0], dtype=torch.bool))
    assert evaluate(everything, test, attack).to_dict()["ca"] == 0.0
    assert evaluate(everything, test, attack).asr["patch"] == 0.0


def test_strip_options_are_checked_before_work(badnet_setup: Any) -> None:
    _badnet, _attack, inputs, _test = badnet_setup
    for bad, says in (
        ({"n": 0}, r"n \(superimpositions"),
        ({"frr": 0.0}, "frr is a fraction"),
        ({"frr": 1.0}, "frr is a fraction"),
        ({"blend": "max"}, "blend must be"),
    ):
        with pytest.raises(ValueError, match=says):
            get_defense("strip", **bad)
    small = DefenseInputs(inputs.badnet, inputs.retrain.subset(range(50)), inputs.holdout)
    with pytest.raises(ValueError, match="distinct clean images"):
        get_defense("strip").run(small)


def test_ours_and_art_s_strip_on_a_handful_of_inputs(badnet_setup: Any) -> None:
    """ART's score is a different quantity (entropy across the superimpositions per class,
    threshold from a fitted normal); the benchmark compares the two at scale."""
    from scipy.stats import norm  # ART (a dev dependency) brings scipy

    from nnoculation.benchmarks.strip_vs_art import art_strip

    badnet, attack, inputs, test = badnet_setup
    images = torch.cat([test.images[:6], _triggered(attack, test)[:6]])
    art = art_strip(badnet, inputs.holdout.images[:60], images, n=20, rate=0.05, seed=0)
    mean, std = norm.fit(art.fit_scores)
    assert art.threshold == pytest.approx(norm.ppf(0.05, loc=mean, scale=std))
    assert art.scores.shape == (12,) and art.refused.shape == (12,)
    ours = StripDetector(badnet, inputs.retrain.images, 0.0, 20, 0, "add").entropy(images)
    # Ours: a triggered input keeps the target under superimposition -> lower entropy.
    assert float(ours[6:].mean()) < float(ours[:6].mean())
    assert all(math.isfinite(float(v)) for v in art.scores)
