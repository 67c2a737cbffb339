"""The chain behind a cell: the attacker's BadNet and floor, the defender's deployment, the
stream and the repair, and the baseline defenses, all measured on the split's test pool.

BadNets, reference models and deployments are shared by the cells of an (attack, seed) and
kept under ``runs/bench/<name>/work/`` with a stamp (code commit + settings hash): a later run
reuses them only when the same clean commit made them with the same settings, as for cells
(:mod:`nnoculation.bench.cells`); on a dirty tree they are shared within one run only.

Variants share by content. A BadNet (with its clean reference model, hence its floor) is
decided by the attacker's settings alone: the recipe (``train``, ``splits``), the split, the
attack and a noise-trained attack's ``attacker_noise``. Variants that change none of them (only
``predeploy``, ``stream``, ``repair``, ``validation_share`` or a defense's options) use the
top level's BadNet of each seed, in the folder a config without variants uses; a variant
that changes one gets its own, in a folder named by the hash of its attacker settings (shared
by every variant with the same ones). Deployments likewise: decided by the BadNet, the
pre-deployment settings and the validation share, so variants that change only the stream or
the repair (Figure 4c) share one search per seed.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.bundle import Bundle, load_bundle
from nnoculation.attacks import AttackSpec, attack_from_dict
from nnoculation.badnets import (
    BADNET_ROLE,
    make_badnet,
    make_spec_badnet,
)
from nnoculation.bench.attacker import attack_spec, base_name, fs_name
from nnoculation.bench.cells import CellKey, Measured, is_clean, settings_hash
from nnoculation.bench.config import BADNET, POST, PRE, BenchConfig
from nnoculation.bench.protocol import defender_splits, split_source
from nnoculation.benchmarks.common import pct1
from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import load_dataset
from nnoculation.data.splits import SplitConfig, Splits, make_splits
from nnoculation.defenses import DefenseInputs
from nnoculation.ensemble import Ensemble
from nnoculation.metrics import Predictor, evaluate
from nnoculation.pipeline import DEPLOYMENT_DIR, predeploy_to_dir
from nnoculation.recipes import Recipe
from nnoculation.repair.engine import repair
from nnoculation.stream import simulate_stream

STAMP = "stamp.json"


@dataclass
class BadNet:
    bundle: Bundle
    attack: AttackSpec
    floor: dict[str, float]


@dataclass
class Deployment:
    """The pre-deployment outcome: the bundle (None when no GoodNet was within theta)."""

    bundle: Bundle | None
    report: dict[str, Any]


def weights_digest(bundle: Bundle, role: str) -> str:
    """The sha256 of a bundle's net file for ``role``, as its manifest lists it."""
    return bundle.manifest.files[bundle.manifest.nets[role].file]


class Chain:
    """Measures cells of one config; see the module doc."""

    def __init__(self, cfg: BenchConfig, work_dir: Path, commit: str) -> None:
        self.cfg, self.work, self.commit = cfg, work_dir, commit
        # Work made on a dirty tree is reused within this run only.
        self.run = None if is_clean(commit) else uuid.uuid4().hex
        self._splits: dict[SplitConfig, Splits] = {}

    def measure(self, key: CellKey) -> Measured:
        """One cell, naming the digests of the shared models it was measured on."""
        cfg = self.cfg.variant_config(key.variant)
        seeds = cfg.seeds_of(key.seed)
        splits = self.splits(cfg)
        bad = self.badnet(cfg, key.attack, seeds.badnet)
        badnet = bad.bundle.net(BADNET_ROLE)
        artifacts = {"badnet": weights_digest(bad.bundle, BADNET_ROLE)}
        if key.defense == BADNET:
            measured = self._measured(badnet, bad, splits.test, 0.0)
        else:
            defender = defender_splits(splits, cfg.validation_share)
            if key.defense in (PRE, POST):
                dep = self.deployment(cfg, key.attack, key.seed, bad, defender)
                if dep.bundle is not None:
                    artifacts["goodnet"] = weights_digest(dep.bundle, "goodnet")
                if key.defense == PRE:
                    measured = self._pre(dep, bad, splits.test)
                else:
                    measured = self._post(cfg, dep, bad, splits, seeds.chain)
            else:
                inputs = DefenseInputs(badnet, defender.retrain, defender.holdout, seed=seeds.chain)
                defended = cfg.defense(key.defense).run(inputs)
                measured = self._measured(
                    defended.predictor, bad, splits.test, defended.offline_seconds, defended.details
                )
        measured.artifacts = artifacts
        return measured

    def splits(self, cfg: BenchConfig) -> Splits:
        """The split of ``cfg``'s recipe (it does not depend on the seed), made once per run."""
        recipe = cfg.recipe(0)
        if recipe.splits not in self._splits:
            source = split_source(load_dataset(recipe.dataset), cfg.split)
            self._splits[recipe.splits] = make_splits(source, recipe.splits)
        return self._splits[recipe.splits]

    def badnet(self, cfg: BenchConfig, attack: str, badnet_seed: int) -> BadNet:
        """The BadNet of ``attack`` trained with ``badnet_seed`` under ``cfg``'s attacker
        settings, and its floor; shared with every variant of the same attacker settings."""
        recipe = cfg.recipe(badnet_seed)
        settings = self._badnet_settings(cfg, attack, badnet_seed)
        folder = f"badnet-s{badnet_seed}"
        if settings != self._badnet_settings(self.cfg, attack, badnet_seed):
            folder = f"badnet-{settings_hash(settings)[:8]}-s{badnet_seed}"
        out = self.work / fs_name(attack) / folder
        self._stamped(self.work / "cache", {}, lambda d: d.mkdir(parents=True))
        splits = self.splits(cfg)
        self._stamped(out, settings, lambda d: self._make_badnet(cfg, attack, recipe, splits, d))
        bundle = load_bundle(out / BADNET_ROLE)
        spec = attack_from_dict(bundle.manifest.provenance["attack"])
        return BadNet(bundle, spec, bundle.manifest.metrics["floor"])

    def _make_badnet(
        self, cfg: BenchConfig, attack: str, recipe: Recipe, splits: Splits, out: Path
    ) -> None:
        cache = self.work / "cache"
        if attack == base_name(attack) and not cfg.attacker_settings(attack):
            make_badnet(attack, recipe, out, cache, splits=splits, progress=False)
            return
        # A noise-trained catalog attack (adaptive:<name>), or a noise strength of its own: the
        # library's cache key for the clean reference model knows the noise policy but not its
        # strength, so a strength other than the catalog's caches its clean models apart.
        noise = cfg.attacker_settings(attack)
        if noise:
            cache = cache / f"noise-{settings_hash(noise)[:8]}"
        spec = attack_spec(attack, splits.attacker.num_classes, splits.attacker.shape, cfg.noise())
        make_spec_badnet(spec, recipe, out, cache, splits, progress=False)

    @staticmethod
    def _badnet_settings(cfg: BenchConfig, attack: str, badnet_seed: int) -> dict[str, Any]:
        recipe = cfg.recipe(badnet_seed)
        return {
            "recipe": recipe.to_dict(),
            "attack": attack,
            "split": cfg.split,
            **cfg.attacker_settings(attack),
        }

    @classmethod
    def _deployment_settings(cls, cfg: BenchConfig, attack: str, seed: int) -> dict[str, Any]:
        seeds = cfg.seeds_of(seed)
        pre = cfg.predeploy_config(cfg.recipe(seeds.badnet), seeds.chain)
        settings: dict[str, Any] = {
            "badnet": cls._badnet_settings(cfg, attack, seeds.badnet),
            "predeploy": pre.to_dict(),
        }
        if cfg.validation_share != 1.0:
            settings["validation_share"] = cfg.validation_share
        return settings

    def deployment(
        self, cfg: BenchConfig, attack: str, seed: int, bad: BadNet, splits: Splits
    ) -> Deployment:
        """The pre-deployment search on ``bad`` with the seed's chain seed and the defender's
        ``splits``; shared with every variant of the same deployment settings."""
        seeds = cfg.seeds_of(seed)
        pre = cfg.predeploy_config(cfg.recipe(seeds.badnet), seeds.chain)
        settings = self._deployment_settings(cfg, attack, seed)
        folder = "predeploy"
        if settings != self._deployment_settings(self.cfg, attack, seed):
            folder = f"predeploy-{settings_hash(settings)[:8]}"
        out = self.work / fs_name(attack) / f"s{seed}" / folder
        self._stamped(
            out,
            settings,
            lambda d: predeploy_to_dir(
                bad.bundle.net(BADNET_ROLE),
                splits,
                pre,
                d,
                attack=bad.attack,
                floor=bad.floor,
            ),
        )
        report = json.loads((out / "report.json").read_text())
        bundle_dir = out / DEPLOYMENT_DIR
        bundle = load_bundle(bundle_dir) if (bundle_dir / "manifest.json").exists() else None
        return Deployment(bundle, report)

    def _pre(self, dep: Deployment, bad: BadNet, test: ImageSet) -> Measured:
        details = {
            "goodnet": dep.bundle is not None,
            "alpha": dep.report["alpha"],
            "gamma": dep.report["gamma"],
            "cells_trained": dep.report["cells_trained"],
        }
        return self._measured(self._deployed(dep, bad), bad, test, dep.report["seconds"], details)

    def _post(
        self, cfg: BenchConfig, dep: Deployment, bad: BadNet, splits: Splits, chain_seed: int
    ) -> Measured:
        """A stream through the deployed ensemble until N are quarantined, then one repair;
        what is measured is what serves afterwards: the repaired ensemble if the gate passed
        it, else the pre-deployment one (nothing is published)."""
        if dep.bundle is None:
            reason = "no GoodNet within theta: nothing to repair"
            return self._measured(
                self._deployed(dep, bad),
                bad,
                splits.test,
                0.0,
                {"goodnet": False, "reason": reason},
            )
        deployed = Ensemble(dep.bundle.net("badnet"), dep.bundle.net("goodnet"))
        stream = simulate_stream(deployed, splits.stream, bad.attack, cfg.stream_config(chain_seed))
        details: dict[str, Any] = {
            "goodnet": True,
            "quarantine": {
                "size": int(stream.images.shape[0]),
                "precision": pct1(stream.precision),
                "recall": pct1(stream.recall),
            },
        }
        if stream.images.shape[0] == 0:
            details |= {"passed_gate": False, "reason": "empty quarantine: nothing to repair"}
            return self._measured(deployed, bad, splits.test, 0.0, details)
        outcome = repair(dep.bundle, stream.images, cfg.repair_config(chain_seed), progress=False)
        details |= {
            "passed_gate": outcome.passed_gate,
            "reason": outcome.reason,
            "trigger_effect": pct1(outcome.trigger_effect),
            "distilled": outcome.distilled,  # the GoodNet's fine-tune used soft targets
            # the relapse (None: the quarantine showed no target and no one-to-one label pairs)
            "relapse": None if outcome.relapse is None else pct1(outcome.relapse),
            "relapse_basis": outcome.relapse_basis,  # targets or one-to-one pairs
            "holdout_ca": {k: pct1(v) for k, v in outcome.holdout.items()},  # what the gate saw
            "seconds": {k: round(v, 1) for k, v in outcome.seconds.items()},
        }
        if outcome.passed_gate:
            deployed = Ensemble(outcome.badnet, outcome.goodnet)
        return self._measured(deployed, bad, splits.test, sum(outcome.seconds.values()), details)

    @staticmethod
    def _deployed(dep: Deployment, bad: BadNet) -> Predictor:
        """What serves after pre-deployment: the ensemble, or the BadNet when no GoodNet was
        found (the search refused every cell)."""
        if dep.bundle is None:
            return bad.bundle.net(BADNET_ROLE)
        return Ensemble(dep.bundle.net("badnet"), dep.bundle.net("goodnet"))

    def _measured(
        self,
        predictor: Predictor,
        bad: BadNet,
        test: ImageSet,
        seconds: float,
        details: dict[str, Any] | None = None,
    ) -> Measured:
        ev = evaluate(predictor, test, bad.attack)
        triggers = list(ev.asr)
        return Measured(
            triggers=triggers,
            ca=pct1(ev.ca),
            asr=[pct1(ev.asr[t]) for t in triggers],
            floor=[pct1(bad.floor[t]) for t in triggers],
            seconds=seconds,
            details=details or {},
        )

    def _stamped(self, out: Path, settings: dict[str, Any], make: Callable[[Path], Any]) -> None:
        """Make ``out`` with ``make`` unless the same code made it with the same settings."""
        stamp = {"commit": self.commit, "run": self.run, "settings": settings_hash(settings)}
        try:
            if json.loads((out / STAMP).read_text()) == stamp:
                return
        except (OSError, ValueError):
            pass
        shutil.rmtree(out, ignore_errors=True)
        make(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / STAMP).write_text(json.dumps(stamp))
