"""The gate's relapse check: a repair whose GoodNet now gives the quarantined inputs the
BadNet's suspect answers (the backdoor's target) is refused, however good its hold-out CA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_bundle
from models.nets import Net
from nnoculation.cli import EXIT_GATE_FAILED, EXIT_USAGE, main
from nnoculation.repair import engine
from nnoculation.repair.engine import RepairConfig, RepairConfigError, relapse, repair
from nnoculation.repair.purify import PurifyConfig, purify_quarantine
from nnoculation.repair.reverse import MEAN_DIFF
from tests.conftest import NUM_CLASSES, synthetic_set
from tests.deployment_fixtures import make_deployment, triggered


def _deployment(tiny_net: Net, tmp_path: Path):  # type: ignore[no-untyped-def]
    path, attack, _test = make_deployment(tiny_net, tmp_path)
    quarantine = triggered(attack, synthetic_set(60, seed=21).images)
    return path, load_bundle(path), quarantine


def test_relapse_is_how_much_more_the_goodnet_answers_the_badnets_suspect_label(
    tiny_net: Net, tmp_path: Path
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    purified = purify_quarantine(quarantine, badnet, NUM_CLASSES, PurifyConfig())
    assert purified.applied  # the patch's target stands out
    suspect = badnet.predict(purified.images)
    before = float((goodnet.predict(purified.images) == suspect).float().mean())
    assert before < 0.9  # (a fourth of these images are of the target class itself)
    # A "repaired" GoodNet that answers exactly as the BadNet: the worst relapse there is.
    assert relapse(badnet, goodnet, badnet, purified) == pytest.approx(1 - before)
    assert relapse(badnet, goodnet, goodnet, purified) == 0.0  # unchanged: nothing relapsed
    off = purify_quarantine(quarantine, badnet, NUM_CLASSES, PurifyConfig(enabled=False))
    assert relapse(badnet, goodnet, badnet, off) is None  # no target named: not checked


def test_the_gate_refuses_a_goodnet_that_learned_the_backdoors_answers(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    cfg = RepairConfig(profile=MEAN_DIFF, theta=0.99)  # hold-out CA cannot fail this gate
    calls: list[tuple[Net, Net, Net]] = []  # (badnet, goodnet, repaired goodnet)

    def measured(badnet: Net, goodnet: Net, repaired: Net, purified: object) -> float:
        calls.append((badnet, goodnet, repaired))
        return 0.8

    monkeypatch.setattr(engine, "relapse", measured)
    outcome = repair(bundle, quarantine, cfg, progress=False)
    assert not outcome.passed_gate and outcome.failing == ["goodnet"]
    assert outcome.reason is not None and "max_relapse 50%" in outcome.reason
    assert outcome.report()["relapse"] == 0.8
    assert calls[0][2] is outcome.goodnet  # judged on the net the ensemble would serve
    assert "relapse" in engine.repair_summary(outcome)
    lenient = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99,
                     max_relapse=0.9), progress=False)  # fmt: skip
    assert lenient.passed_gate, lenient.reason
    unchecked = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99,
                       max_relapse=None), progress=False)  # fmt: skip
    assert unchecked.passed_gate, unchecked.reason


def test_a_real_repair_of_a_fixed_patch_passes_the_relapse_check(
    tiny_net: Net, tmp_path: Path
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    outcome = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, finetune_epochs=4,
                     theta=0.1), progress=False)  # fmt: skip
    assert outcome.relapse is not None and outcome.relapse <= 0.1, outcome.relapse
    assert outcome.passed_gate, outcome.reason


def test_the_cli_takes_max_relapse_and_exits_with_the_gates_code(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _bundle, quarantine = _deployment(tiny_net, tmp_path)
    q = tmp_path / "q.npz"
    np.savez(q, images=quarantine.permute(0, 2, 3, 1).numpy())
    monkeypatch.setattr(engine, "relapse", lambda *_args: 0.6)
    base = ["repair", "--bundle", str(path), "--quarantine", str(q), "--profile", MEAN_DIFF,
            "--theta", "0.99"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a")]) == EXIT_GATE_FAILED
    report = json.loads((tmp_path / "a" / "repair_report.json").read_text())
    assert report["relapse"] == 0.6 and "max_relapse" in report["reason"]
    assert report["config"]["max_relapse"] == 0.5
    assert main([*base, "--max-relapse", "0.7", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--max-relapse", "1.5", "--out", str(tmp_path / "c")]) == EXIT_USAGE


def test_max_relapse_is_checked_when_the_config_is_made() -> None:
    with pytest.raises(RepairConfigError, match="max_relapse"):
        RepairConfig(max_relapse=1.5)
    assert RepairConfig.from_dict({"max_relapse": None}).max_relapse is None
