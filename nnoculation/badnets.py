"""The attacker's side, for evaluation only: make a BadNet with an attack from the suite, and
the clean reference model ("trained the same way") whose target rate on the same triggered
images is the ASR *floor*. The defense itself never imports this module."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.bundle import Bundle, load_bundle
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from nnoculation.attacks import AttackSpec, attack_from_dict, get_attack
from nnoculation.bundle_io import write_bundle_dir
from nnoculation.data.sources import load_dataset
from nnoculation.data.splits import Splits, make_splits
from nnoculation.metrics import Evaluation, evaluate
from nnoculation.recipes import Recipe
from nnoculation.runtime import seeded_rng
from nnoculation.training import train

DEFAULT_CACHE = Path(".cache/nnoculation")
REFERENCE_ROLE = "clean"
BADNET_ROLE = "badnet"


def input_spec_for(splits: Splits) -> InputSpec:
    """Normalisation from the attacker's training images (per-channel mean / std)."""
    x = splits.attacker.images.to(torch.float32) / 255.0
    c = x.shape[1]
    mean = x.transpose(0, 1).reshape(c, -1).mean(dim=1)
    std = x.transpose(0, 1).reshape(c, -1).std(dim=1).clamp_min(1e-3)
    _, h, w = splits.attacker.shape
    return InputSpec(c, h, w, tuple(mean.tolist()), tuple(std.tolist()))


def new_net(recipe: Recipe, spec: InputSpec, num_classes: int) -> Net:
    """A freshly initialised zoo net, seeded by the recipe."""
    with seeded_rng(recipe.train.seed):
        module = build_classifier(recipe.arch, spec, num_classes, **recipe.arch_kwargs)
    return Net(module, "zoo", spec, num_classes, recipe.arch, dict(recipe.arch_kwargs))


def load_splits(recipe: Recipe) -> Splits:
    return make_splits(load_dataset(recipe.dataset), recipe.splits)


def _recipe_key(recipe: Recipe) -> str:
    blob = json.dumps(recipe.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reference_model(
    recipe: Recipe,
    splits: Splits,
    cache_dir: Path,
    attack: AttackSpec | None = None,
    progress: bool = True,
) -> tuple[Net, float]:
    """The clean model trained with ``recipe`` on the attacker's unpoisoned set (with the
    attack's augmentation policy, if any: the floor compares with a model trained the same
    way), cached by recipe and policy; returns the net and the seconds its training took."""
    noise = attack is not None and attack.noise_train
    key = _recipe_key(recipe) + ("-noise" if noise else "")
    path = cache_dir / f"clean-{recipe.dataset}-{recipe.arch}-{key}"
    if (path / "manifest.json").exists():
        bundle = load_bundle(path)
        return bundle.net(REFERENCE_ROLE), float(bundle.manifest.provenance["train_seconds"])
    data = splits.attacker
    if attack is not None:
        data = attack.clean_training_set(data, seed=recipe.train.seed)
    net = new_net(recipe, input_spec_for(splits), splits.attacker.num_classes)
    stats = train(net, data, recipe.train, desc="clean reference", progress=progress)
    write_bundle_dir(
        path,
        name=f"clean-{recipe.dataset}",
        nets={REFERENCE_ROLE: net},
        class_names=splits.attacker.class_names,
        metrics={},
        provenance={
            "recipe": recipe.to_dict(),
            "noise_train": noise,
            "train_seconds": stats.seconds,
        },
    )
    return net, stats.seconds


@dataclass
class BadNetReport:
    """What ``nnoculation attack`` prints and stores: CA / ASR of the BadNet beside the clean
    reference model's CA and the floor of every trigger."""

    attack: AttackSpec
    recipe: Recipe
    badnet: Evaluation
    clean: Evaluation
    train_seconds: float
    clean_train_seconds: float

    @property
    def floor(self) -> dict[str, float]:
        return self.clean.asr

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack.name,
            "spec": self.attack.to_dict(),
            "recipe": self.recipe.to_dict(),
            "badnet": self.badnet.to_dict(),
            "clean": self.clean.to_dict(),
            "floor": self.floor,
            "train_seconds": self.train_seconds,
            "clean_train_seconds": self.clean_train_seconds,
        }


def attack_recipe(recipe: Recipe, attack: AttackSpec) -> Recipe:
    """The recipe the attacker actually trains with (an attack may train longer or use its own
    architecture); the clean reference model for the floor uses the same one."""
    if attack.train_epochs is not None:
        recipe = recipe.with_(train=recipe.train.with_(epochs=attack.train_epochs))
    if attack.arch is not None:
        recipe = recipe.with_(arch=attack.arch, arch_kwargs=dict(attack.arch_kwargs or {}))
    return recipe


def badnet_is_current(out_dir: Path, attack_name: str, recipe: Recipe) -> bool:
    """Whether ``out_dir`` holds a BadNet made with the catalog's current spec and ``recipe``,
    so a benchmark may reuse it rather than train again."""
    if not (out_dir / BADNET_ROLE / "manifest.json").exists():
        return False
    manifest = load_bundle(out_dir / BADNET_ROLE).manifest
    current = get_attack(attack_name, manifest.num_classes, manifest.input_spec.shape)
    prov = manifest.provenance
    if "attack" not in prov or "recipe" not in prov:
        return False
    # Round-trip the stored spec so fields added later (with defaults) compare equal.
    stored = attack_from_dict(prov["attack"]).to_dict()
    return (
        prov["recipe"] == attack_recipe(recipe, current).to_dict() and stored == current.to_dict()
    )


def make_badnet(
    attack_name: str,
    recipe: Recipe,
    out_dir: Path,
    cache_dir: Path = DEFAULT_CACHE,
    splits: Splits | None = None,
    progress: bool = True,
) -> BadNetReport:
    """Poison the attacker's set with ``attack_name``, train a BadNet, evaluate it against the
    clean reference model and write ``out_dir/badnet`` (a bundle), ``attack.json`` and
    ``metrics.json``."""
    splits = splits or load_splits(recipe)
    attack = get_attack(attack_name, splits.attacker.num_classes, splits.attacker.shape)
    return make_spec_badnet(attack, recipe, out_dir, cache_dir, splits, progress)


def make_spec_badnet(
    attack: AttackSpec,
    recipe: Recipe,
    out_dir: Path,
    cache_dir: Path = DEFAULT_CACHE,
    splits: Splits | None = None,
    progress: bool = True,
) -> BadNetReport:
    """:func:`make_badnet` for an attack spec rather than a catalog name (a noise-trained
    variant of a catalog attack, say): the same steps and files. The clean reference model is
    cached in ``cache_dir`` by recipe and noise policy, so a caller whose spec differs from
    the catalog's in a way that key does not see gives it a folder of its own."""
    splits = splits or load_splits(recipe)
    train_set = splits.attacker
    recipe = attack_recipe(recipe, attack)
    poisoned = attack.poison_training_set(train_set, seed=recipe.train.seed)
    net = new_net(recipe, input_spec_for(splits), train_set.num_classes)
    start = time.perf_counter()
    train(net, poisoned, recipe.train, desc=f"BadNet {attack.name}", progress=progress)
    seconds = time.perf_counter() - start
    clean, clean_seconds = reference_model(recipe, splits, cache_dir, attack, progress)
    report = BadNetReport(
        attack=attack,
        recipe=recipe,
        badnet=evaluate(net, splits.test, attack),
        clean=evaluate(clean, splits.test, attack),
        train_seconds=seconds,
        clean_train_seconds=clean_seconds,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bundle_dir(
        out_dir / BADNET_ROLE,
        name=f"badnet-{attack.name.replace(':', '+')}",
        nets={BADNET_ROLE: net},
        class_names=train_set.class_names,
        metrics=report.to_dict(),
        provenance={
            "recipe": recipe.to_dict(),
            "attack": attack.to_dict(),
            "train_seconds": seconds,
        },
    )
    (out_dir / "attack.json").write_text(json.dumps(attack.to_dict(), indent=2) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def current_badnet(
    attack_name: str, recipe: Recipe, out_dir: Path, splits: Splits, cache_dir: Path = DEFAULT_CACHE
) -> tuple[Bundle, AttackSpec, dict[str, float]]:
    """The BadNet bundle in ``out_dir`` (made or re-made when missing or stale), its attack spec
    and the floor of each trigger: what every benchmark starts from."""
    if not badnet_is_current(out_dir, attack_name, recipe):
        make_badnet(attack_name, recipe, out_dir, cache_dir, splits=splits)
    bundle = load_bundle(out_dir / BADNET_ROLE)
    attack = attack_from_dict(bundle.manifest.provenance["attack"])
    return bundle, attack, bundle.manifest.metrics["floor"]
