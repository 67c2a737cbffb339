"""The chain behind a cell: the attacker's BadNet and floor, the defender's deployment, the
stream and the repair, and the baseline defenses, all measured on the split's test pool.

BadNets, reference models and deployments are shared by the cells of an (attack, seed) and
kept under ``runs/bench/<name>/work/`` with a stamp (code commit + settings hash): a later run
reuses them only when the same clean commit made them with the same settings, as for cells
(:mod:`nnoculation.bench.cells`); on a dirty tree they are shared within one run only.
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
from nnoculation.badnets import BADNET_ROLE, make_badnet
from nnoculation.bench.cells import CellKey, Measured, is_clean, settings_hash
from nnoculation.bench.config import BADNET, POST, PRE, BenchConfig
from nnoculation.bench.protocol import split_source
from nnoculation.benchmarks.common import pct1
from nnoculation.data.sources import load_dataset
from nnoculation.data.splits import Splits, make_splits
from nnoculation.defenses import DefenseInputs
from nnoculation.ensemble import Ensemble
from nnoculation.metrics import Predictor, evaluate
from nnoculation.pipeline import DEPLOYMENT_DIR, predeploy_to_dir
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


class Chain:
    """Measures cells of one config; see the module doc."""

    def __init__(self, cfg: BenchConfig, work_dir: Path, commit: str) -> None:
        self.cfg, self.work, self.commit = cfg, work_dir, commit
        # Work made on a dirty tree is reused within this run only.
        self.run = None if is_clean(commit) else uuid.uuid4().hex
        self._splits: Splits | None = None

    def measure(self, key: CellKey) -> Measured:
        seeds = self.cfg.seeds_of(key.seed)
        bad = self.badnet(key.attack, seeds.badnet)
        badnet = bad.bundle.net(BADNET_ROLE)
        if key.defense == BADNET:
            return self._measured(badnet, bad, 0.0)
        if key.defense in (PRE, POST):
            dep = self.deployment(key.attack, key.seed, bad)
            if key.defense == PRE:
                return self._pre(dep, bad)
            return self._post(dep, bad, seeds.chain)
        inputs = DefenseInputs(badnet, self.splits.retrain, self.splits.holdout, seed=seeds.chain)
        defended = self.cfg.defense(key.defense).run(inputs)
        return self._measured(defended.predictor, bad, defended.offline_seconds, defended.details)

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            recipe = self.cfg.recipe(0)  # the split does not depend on the seed
            source = split_source(load_dataset(recipe.dataset), self.cfg.split)
            self._splits = make_splits(source, recipe.splits)
        return self._splits

    def badnet(self, attack: str, badnet_seed: int) -> BadNet:
        """The BadNet of ``attack`` trained with ``badnet_seed``, and its floor."""
        recipe = self.cfg.recipe(badnet_seed)
        out = self.work / attack / f"badnet-s{badnet_seed}"
        self._stamped(self.work / "cache", {}, lambda d: d.mkdir(parents=True))
        self._stamped(
            out,
            self._badnet_settings(attack, badnet_seed),
            lambda d: make_badnet(
                attack, recipe, d, self.work / "cache", splits=self.splits, progress=False
            ),
        )
        bundle = load_bundle(out / BADNET_ROLE)
        attack_spec = attack_from_dict(bundle.manifest.provenance["attack"])
        return BadNet(bundle, attack_spec, bundle.manifest.metrics["floor"])

    def _badnet_settings(self, attack: str, badnet_seed: int) -> dict[str, Any]:
        recipe = self.cfg.recipe(badnet_seed)
        return {"recipe": recipe.to_dict(), "attack": attack, "split": self.cfg.split}

    def deployment(self, attack: str, seed: int, bad: BadNet) -> Deployment:
        """The pre-deployment search on ``bad`` with the seed's chain seed."""
        seeds = self.cfg.seeds_of(seed)
        cfg = self.cfg.predeploy_config(self.cfg.recipe(seeds.badnet), seeds.chain)
        out = self.work / attack / f"s{seed}" / "predeploy"
        settings = {
            "badnet": self._badnet_settings(attack, seeds.badnet),
            "predeploy": cfg.to_dict(),
        }
        self._stamped(
            out,
            settings,
            lambda d: predeploy_to_dir(
                bad.bundle.net(BADNET_ROLE),
                self.splits,
                cfg,
                d,
                attack=bad.attack,
                floor=bad.floor,
            ),
        )
        report = json.loads((out / "report.json").read_text())
        bundle_dir = out / DEPLOYMENT_DIR
        bundle = load_bundle(bundle_dir) if (bundle_dir / "manifest.json").exists() else None
        return Deployment(bundle, report)

    def _pre(self, dep: Deployment, bad: BadNet) -> Measured:
        details = {
            "goodnet": dep.bundle is not None,
            "alpha": dep.report["alpha"],
            "gamma": dep.report["gamma"],
            "cells_trained": dep.report["cells_trained"],
        }
        return self._measured(self._deployed(dep, bad), bad, dep.report["seconds"], details)

    def _post(self, dep: Deployment, bad: BadNet, chain_seed: int) -> Measured:
        """A stream through the deployed ensemble until N are quarantined, then one repair;
        what is measured is what serves afterwards: the repaired ensemble if the gate passed
        it, else the pre-deployment one (nothing is published)."""
        if dep.bundle is None:
            reason = "no GoodNet within theta: nothing to repair"
            return self._measured(
                self._deployed(dep, bad), bad, 0.0, {"goodnet": False, "reason": reason}
            )
        deployed = Ensemble(dep.bundle.net("badnet"), dep.bundle.net("goodnet"))
        stream = simulate_stream(
            deployed, self.splits.stream, bad.attack, self.cfg.stream_config(chain_seed)
        )
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
            return self._measured(deployed, bad, 0.0, details)
        cfg = self.cfg.repair_config(chain_seed)
        outcome = repair(dep.bundle, stream.images, cfg, progress=False)
        details |= {
            "passed_gate": outcome.passed_gate,
            "reason": outcome.reason,
            "trigger_effect": pct1(outcome.trigger_effect),
            "distilled": outcome.distilled,  # the GoodNet's fine-tune used soft targets
            "holdout_ca": {k: pct1(v) for k, v in outcome.holdout.items()},  # what the gate saw
            "seconds": {k: round(v, 1) for k, v in outcome.seconds.items()},
        }
        if outcome.passed_gate:
            deployed = Ensemble(outcome.badnet, outcome.goodnet)
        return self._measured(deployed, bad, sum(outcome.seconds.values()), details)

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
        seconds: float,
        details: dict[str, Any] | None = None,
    ) -> Measured:
        ev = evaluate(predictor, self.splits.test, bad.attack)
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
