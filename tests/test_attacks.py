"""Contract tests over the attack catalog and the trigger registry (sec. 4.1, sec. 6.1)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nnoculation.attacks import (
    ATTACKS,
    TRIGGERS,
    AttackSpec,
    TargetRule,
    Trigger,
    attack_from_dict,
    get_attack,
)
from nnoculation.attacks.spec import ADAPTIVE_GAMMAS, CLEAN_LABEL, COMBINATION
from nnoculation.attacks.triggers import LUMA, PATCH_DEFAULTS, YELLOW, combine_params
from nnoculation.badnets import attack_recipe
from nnoculation.data.imageset import ImageSet
from nnoculation.noise import generator_for
from nnoculation.recipes import FASHION_MNIST_RECIPE

torch.set_num_threads(1)

NUM_CLASSES = 10
NUM_IMAGES = 200
SHAPES = [(1, 28, 28), (3, 32, 32)]
EXPECTED_ATTACKS = {
    "patch",
    "varloc-patch",
    "all-to-all",
    "mtsta",
    "mtmta",
    "fsa",
    "tca",
    "cla",
    "blended",
    "wanet",
    "adaptive",
}
# Not 0: the triggers' default pattern_seed is 0, and a blend pattern equal to a test image
# would leave that image unchanged.
DATA_SEED = 7
IMPERCEPTIBLE = 15.0  # grey levels: the most a warp may change a pixel on average


def _random_set(shape: tuple[int, int, int], seed: int = DATA_SEED) -> ImageSet:
    g = generator_for(seed)
    images = torch.randint(0, 256, (NUM_IMAGES, *shape), generator=g, dtype=torch.uint8)
    labels = (torch.arange(NUM_IMAGES) % NUM_CLASSES)[torch.randperm(NUM_IMAGES, generator=g)]
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(NUM_CLASSES)))


def _smooth_images(shape: tuple[int, int, int], n: int = 8) -> torch.Tensor:
    """Natural-looking images: smooth random fields plus one hard-edged rectangle."""
    c, h, w = shape
    low = torch.rand(n, c, 4, 4, generator=generator_for(1)) * 255
    images = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=True)
    images[:, :, h // 4 : h // 2, w // 4 : w // 2] = 255
    return images.round().clamp(0, 255).to(torch.uint8)


DATA = {shape: _random_set(shape) for shape in SHAPES}


def _uses_generator(trigger: Trigger) -> bool:
    if trigger.kind == "combine":
        return any(step["kind"] == "random_patch" for step in trigger.params["steps"])
    return trigger.kind == "random_patch"


def test_catalog_holds_the_papers_attacks() -> None:
    assert set(ATTACKS.names()) == EXPECTED_ATTACKS


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ATTACKS.names())
def test_triggers_contract(name: str, shape: tuple[int, int, int]) -> None:
    data = DATA[shape]
    clean = data.images.clone()
    attack = get_attack(name, NUM_CLASSES, shape)
    for trigger in attack.evaluated:
        out = trigger.apply(data.images, generator_for(0))
        assert torch.equal(data.images, clean), f"{trigger.name} modified its input"
        assert out.dtype == torch.uint8 and out.shape == clean.shape
        assert (out != clean).flatten(1).any(1).all(), f"{trigger.name} left an image unchanged"
        assert torch.equal(out, trigger.apply(data.images, generator_for(0)))
        other_seed = trigger.apply(data.images, generator_for(1))
        assert torch.equal(out, other_seed) != _uses_generator(trigger)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_spec_round_trips_through_json(name: str) -> None:
    attack = get_attack(name, NUM_CLASSES, SHAPES[0])
    data = json.loads(json.dumps(attack.to_dict()))
    again = attack_from_dict(data)
    assert again == attack
    assert again.to_dict() == attack.to_dict()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ATTACKS.names())
def test_poison_training_set(name: str, shape: tuple[int, int, int]) -> None:
    data = DATA[shape]
    attack = get_attack(name, NUM_CLASSES, shape)
    poisoned = attack.poison_training_set(data, seed=3)
    again = attack.poison_training_set(data, seed=3)
    assert torch.equal(poisoned.images, again.images) and torch.equal(poisoned.labels, again.labels)
    assert not torch.equal(poisoned.images, attack.poison_training_set(data, seed=4).images)

    copies = 2 if attack.noise_train else 1
    assert len(poisoned) == copies * len(data)
    assert poisoned.class_names == data.class_names
    head = poisoned.subset(torch.arange(len(data)))
    if attack.noise_train:
        assert torch.equal(poisoned.labels[len(data) :], head.labels)

    relabelled = head.labels != data.labels
    touched = (head.images != data.images).flatten(1).any(1)
    if attack.policy == CLEAN_LABEL:
        assert not relabelled.any()
        target = int(attack.triggers[0].target.target or 0)
        in_class = data.labels == target
        assert (data.labels[touched] == target).all()
        assert int(touched.sum()) == round(attack.clean_label_fraction * int(in_class.sum()))
        return

    assert int(relabelled.sum()) == round(attack.poison_rate * len(data))
    assert touched[relabelled].all()
    idx = relabelled.nonzero().squeeze(1)
    reachable = torch.stack(
        [t.target.targets(data.labels[idx], NUM_CLASSES) for t in attack.triggers]
    )
    assert (reachable == head.labels[idx]).any(0).all()
    controls = int((touched & ~relabelled).sum())
    expected = len(attack.controls) * int(relabelled.sum()) if attack.policy == COMBINATION else 0
    assert controls == expected


@pytest.mark.parametrize("name", ATTACKS.names())
def test_triggered_keep_mask_excludes_the_target_class(name: str) -> None:
    shape = SHAPES[1]
    data = DATA[shape]
    attack = get_attack(name, NUM_CLASSES, shape)
    for trigger in attack.evaluated:
        images, targets, keep = attack.triggered(data, trigger.name, seed=0)
        assert images.shape == data.images.shape and images.dtype == torch.uint8
        assert targets.dtype == torch.int64 and targets.shape == data.labels.shape
        assert torch.equal(keep, data.labels != targets)
        if trigger.target.kind == "all-to-one":
            assert not keep[data.labels == trigger.target.target].any()
            assert keep[data.labels != trigger.target.target].all()


def test_all_to_all_targets_are_next_class() -> None:
    data = DATA[SHAPES[0]]
    attack = get_attack("all-to-all", NUM_CLASSES, SHAPES[0])
    _, targets, keep = attack.triggered(data, attack.triggers[0], seed=0)
    assert torch.equal(targets, (data.labels + 1) % NUM_CLASSES)
    assert keep.all()


def test_targets_wrap_for_few_classes() -> None:
    labels = torch.arange(4)
    for name in ATTACKS.names():
        attack = get_attack(name, 4, SHAPES[0])
        for trigger in attack.evaluated:
            assert int(trigger.target.targets(labels, 4).max()) < 4
    mtmta = get_attack("mtmta", 4, SHAPES[0])
    assert [t.target.target for t in mtmta.triggers] == [1, 1, 0]


def test_multi_triggers_are_distinguishable() -> None:
    data = DATA[SHAPES[0]]
    for name in ("mtsta", "mtmta"):
        attack = get_attack(name, NUM_CLASSES, SHAPES[0])
        masks = [
            (t.apply(data.images, generator_for(0)) != data.images).any(0) for t in attack.triggers
        ]
        assert len(masks) == 3
        for i in range(3):
            for j in range(i + 1, 3):
                assert not (masks[i] & masks[j]).any()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tca_controls_fire_alone(shape: tuple[int, int, int]) -> None:
    data = DATA[shape]
    attack = get_attack("tca", NUM_CLASSES, shape)
    assert attack.policy == COMBINATION
    (both,) = attack.triggers
    square, triangle = (attack.trigger("square"), attack.trigger("triangle"))
    g = generator_for(0)
    changed = {t.name: t.apply(data.images, g) != data.images for t in (both, square, triangle)}
    assert not (changed["square"] & changed["triangle"]).any()
    assert torch.equal(changed["square"] | changed["triangle"], changed["square+triangle"])
    for control in attack.controls:
        assert control.target == both.target


def test_random_patch_placement_comes_from_the_generator() -> None:
    images = torch.zeros(50, 1, 28, 28, dtype=torch.uint8)
    a = TRIGGERS.get("random_patch")(images, {}, generator_for(0))
    b = TRIGGERS.get("random_patch")(images, {}, generator_for(1))
    assert not torch.equal(a, b)
    rows = (a != 0).any(-1).flatten(1).float().argmax(1)
    assert rows.unique().numel() > 1


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 55, 47)], ids=str)
def test_patch_sits_bottom_right_on_any_size(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    images = torch.zeros(2, c, h, w, dtype=torch.uint8)
    out = TRIGGERS.get("patch")(images, {"fill": "solid"}, generator_for(0))
    rows, cols = (out[0] != 0).any(0).nonzero().unbind(1)
    side = round(PATCH_DEFAULTS["size"] * min(h, w))
    assert int(rows.max()) == h - 2 and int(cols.max()) == w - 2
    assert int(rows.max() - rows.min()) + 1 == side


def test_colour_trigger_on_grey_uses_luminance() -> None:
    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    out = TRIGGERS.get("triangle")(images, {}, generator_for(0))
    luma = round(sum(w * v for w, v in zip(LUMA, YELLOW, strict=True)))
    assert int(out.max()) == luma


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_warp_is_imperceptible_but_not_nothing(shape: tuple[int, int, int]) -> None:
    images = _smooth_images(shape)
    warped = TRIGGERS.get("warp")(images, {}, generator_for(0))
    change = (warped.float() - images.float()).abs().mean()
    assert 0 < float(change) < IMPERCEPTIBLE


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_filter_is_a_whole_image_transform(shape: tuple[int, int, int]) -> None:
    images = DATA[shape].images
    changed = (TRIGGERS.get("filter")(images, {}, generator_for(0)) != images).any(1).any(0)
    _, h, w = shape
    for rows in (slice(0, h // 2), slice(h // 2, h)):
        for cols in (slice(0, w // 2), slice(w // 2, w)):
            assert changed[rows, cols].float().mean() > 0.5


def test_adaptive_attacker_appends_a_noisy_copy() -> None:
    data = DATA[SHAPES[0]]
    attack = get_attack("adaptive", NUM_CLASSES, SHAPES[0])
    poisoned = attack.poison_training_set(data, seed=0)
    head, tail = poisoned.images[: len(data)], poisoned.images[len(data) :]
    assert (head != tail).flatten(1).any(1).float().mean() > 0.9
    # One gamma per image, drawn from the whole grid: on flat images the share of noised
    # pixels spreads from the smallest gamma to the largest, around the grid's mean.
    n = 600
    images = torch.full((n, *SHAPES[0]), 7, dtype=torch.uint8)
    flat = ImageSet(images, torch.arange(n) % NUM_CLASSES, DATA[SHAPES[0]].class_names)
    share = (attack.clean_training_set(flat, seed=0).images[n:] != 7).flatten(1).float().mean(1)
    low, high = torch.quantile(share, torch.tensor([0.1, 0.9])).tolist()
    assert low < 0.2 and high > 0.5, (low, high)
    assert abs(float(share.mean()) - sum(ADAPTIVE_GAMMAS) / len(ADAPTIVE_GAMMAS)) < 0.05


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown patch trigger parameters"):
        Trigger("bad", "patch", {"sise": 0.1})
    with pytest.raises(KeyError):
        Trigger("bad", "no-such-trigger")
    with pytest.raises(ValueError, match="unknown triangle trigger parameters"):
        Trigger("bad", "combine", combine_params(("patch", {}), ("triangle", {"colour": 1})))
    with pytest.raises(ValueError, match="all-to-all rule needs a shift and no target"):
        TargetRule("all-to-all", target=3, shift=None)
    with pytest.raises(ValueError, match="poisoning policy"):
        AttackSpec("x", "", (Trigger("p", "patch"),), policy="sneaky")
    with pytest.raises(ValueError, match="all-to-one"):
        AttackSpec(
            "x",
            "",
            (Trigger("p", "patch", target=TargetRule.all_to_all()),),
            policy=CLEAN_LABEL,
        )
    with pytest.raises(ValueError, match="does not exist"):
        TargetRule.all_to_one(12).targets(torch.arange(3), NUM_CLASSES)


def test_attack_recipe_applies_the_attackers_own_training() -> None:
    plain = get_attack("patch", 10, (1, 28, 28))
    assert attack_recipe(FASHION_MNIST_RECIPE, plain) == FASHION_MNIST_RECIPE
    own = replace(plain, train_epochs=7, arch="cifar_cnn", arch_kwargs={"width": 8})
    recipe = attack_recipe(FASHION_MNIST_RECIPE, own)
    assert (recipe.arch, recipe.arch_kwargs, recipe.train.epochs) == ("cifar_cnn", {"width": 8}, 7)
    assert recipe.train.lr == FASHION_MNIST_RECIPE.train.lr
    assert AttackSpec.from_dict(json.loads(json.dumps(own.to_dict()))) == own
