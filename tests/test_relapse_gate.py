"""The relapse: measured on every repair (how often the repaired GoodNet now gives the
quarantined inputs the BadNet's suspect answers, the backdoor's), on suspects by target labels
or by one-to-one label pairs, and a gate check that refuses such a repair however good its
hold-out CA: on pairs by default (``max_pair_relapse``), on targets with ``max_relapse`` set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.bundle import load_bundle
from models.nets import Net
from nnoculation.cli import EXIT_GATE_FAILED, EXIT_USAGE, main
from nnoculation.repair import engine
from nnoculation.repair.engine import RepairConfig, RepairConfigError, repair
from nnoculation.repair.purify import PurifyConfig, purify_quarantine
from nnoculation.repair.relapse import (
    DEFAULT_MAX_RELAPSE,
    PAIRS,
    TARGETS,
    Relapse,
    Suspects,
    one_to_one_pairs,
    relapse,
    suspect_inputs,
)
from nnoculation.repair.reverse import MEAN_DIFF
from tests.conftest import NUM_CLASSES, synthetic_set
from tests.deployment_fixtures import make_deployment, triggered


def _deployment(tiny_net: Net, tmp_path: Path):  # type: ignore[no-untyped-def]
    path, attack, _test = make_deployment(tiny_net, tmp_path)
    quarantine = triggered(attack, synthetic_set(60, seed=21).images)
    return path, load_bundle(path), quarantine


class _Answers:
    """A stand-in for a repaired net: only its answers matter to the relapse."""

    def __init__(self, answer: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.predict = answer


def _same_weights(a: Net, b: Net) -> bool:
    sa, sb = a.module.state_dict(), b.module.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_relapse_is_the_share_of_disagreements_where_the_goodnet_takes_the_badnets_label(
    tiny_net: Net, tmp_path: Path
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    purified = purify_quarantine(quarantine, badnet, NUM_CLASSES, PurifyConfig())
    assert purified.applied  # the patch's target stands out
    images = purified.images
    disagreed = goodnet.predict(images) != badnet.predict(images)
    assert 0 < int(disagreed.sum()) < len(images)  # a file's quarantine: some agree already
    # A "repaired" GoodNet that answers exactly as the BadNet relapsed on every disagreement,
    # however many inputs the two agreed on before (they do not dilute it).
    judged = int(disagreed.sum())
    assert relapse(badnet, goodnet, badnet, images) == Relapse(judged, judged)
    assert relapse(badnet, goodnet, goodnet, images) == Relapse(judged, 0)  # nothing relapsed
    assert relapse(badnet, goodnet, goodnet, images[~disagreed]) is None  # nothing to judge
    # Only the BadNet's own label counts: a repaired net that moved to a third class did not
    # relapse; one that took the BadNet's label on half of the disagreements relapsed 50 %.
    third = _Answers(lambda x: (badnet.predict(x) + 1) % NUM_CLASSES)
    assert relapse(badnet, goodnet, third, images) == Relapse(judged, 0)  # type: ignore[arg-type]
    half = judged // 2
    halfway = _Answers(lambda x: torch.cat([badnet.predict(x[:half]), goodnet.predict(x[half:])]))
    measured = relapse(badnet, goodnet, halfway, images[disagreed])  # type: ignore[arg-type]
    assert measured == Relapse(judged, half)
    assert measured is not None and measured.share == pytest.approx(half / judged)


def test_suspect_inputs_do_not_depend_on_purification_being_on(
    tiny_net: Net, tmp_path: Path
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    on = RepairConfig()
    off = RepairConfig(purify={"enabled": False})
    used = purify_quarantine(quarantine, badnet, NUM_CLASSES, off.purify)
    assert not used.applied  # the trigger model sees the whole quarantine
    suspects = suspect_inputs(quarantine, badnet, goodnet, used, off.purify, NUM_CLASSES)
    expected = purify_quarantine(quarantine, badnet, NUM_CLASSES, on.purify).images
    assert suspects is not None and suspects.basis == TARGETS
    assert torch.equal(suspects.images, expected)
    # Inputs the two nets agree on: no label stands out among them and they make no pairs,
    # so there is nothing to check.
    spread = synthetic_set(60, seed=33).images
    strict = RepairConfig(purify={"min_share": 0.9})
    none = purify_quarantine(spread, badnet, NUM_CLASSES, strict.purify)
    assert not none.applied
    assert suspect_inputs(spread, badnet, goodnet, none, strict.purify, NUM_CLASSES) is None


def _pairs(*runs: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GoodNet and BadNet labels: ``count`` inputs answered (g, b) for each (g, b, count)."""
    good = [g for g, _b, n in runs for _ in range(n)]
    bad = [b for _g, b, n in runs for _ in range(n)]
    return torch.tensor(good), torch.tensor(bad)


# An all-to-all quarantine as a re-made report seed 2 showed it (y -> y + 1, 10-17 inputs a
# pair) beside the clean confusions of Fashion-MNIST (shirt -> T-shirt, pullover -> shirt or
# coat, dress -> coat), and a stream with no attack: those confusions alone.
SHIFT = [(y, (y + 1) % 10, 13) for y in range(10)]
CONFUSIONS = [(6, 0, 19), (2, 6, 9), (2, 4, 7), (3, 4, 3)]
UNATTACKED = [(6, 0, 53), (2, 6, 23), (2, 4, 23), (4, 6, 21), (3, 0, 12), (7, 9, 8), (3, 4, 7)]


def test_one_to_one_pairs_find_an_all_to_all_backdoor_and_not_clean_confusions() -> None:
    good, bad = _pairs(*SHIFT)
    assert one_to_one_pairs(good, bad, 10) == tuple(sorted((y, (y + 1) % 10) for y in range(10)))
    # Clean confusions collide with the pairs they share a label with: (6, 0) with (9, 0) and
    # (6, 7), (2, 6) with (5, 6) and (2, 3); (2, 4) holds too few inputs (7 < 168 / 20) to
    # stand out, and the dress -> coat confusions fall into the backdoor's own pair (3, 4).
    good, bad = _pairs(*SHIFT, *CONFUSIONS)
    expected = {(y, (y + 1) % 10) for y in range(10)} - {(9, 0), (6, 7), (5, 6), (2, 3)}
    assert set(one_to_one_pairs(good, bad, 10)) == expected
    # No attack: every standing confusion shares a label with another, or too few are left.
    assert one_to_one_pairs(*_pairs(*UNATTACKED), 10) == ()
    # An all-to-one backdoor piles every class on one label: all its pairs collide.
    assert one_to_one_pairs(*_pairs(*[(y, 0, 13) for y in range(1, 10)]), 10) == ()
    # Fewer than half of the classes mapped one-to-one is not the pattern.
    assert one_to_one_pairs(*_pairs(*SHIFT[:4]), 10) == ()
    assert one_to_one_pairs(*_pairs(*SHIFT[:5]), 10) == tuple(sorted(p[:2] for p in SHIFT[:5]))
    # Inputs the two nets agree on are not disagreements: they never make a pair.
    good, bad = _pairs(*SHIFT[:5], *[(y, y, 40) for y in range(5, 10)])
    assert one_to_one_pairs(good, bad, 10) == tuple(sorted(p[:2] for p in SHIFT[:5]))
    # A pair of one input is no pattern, however small the quarantine.
    assert one_to_one_pairs(*_pairs(*[(y, (y + 1) % 10, 1) for y in range(10)]), 10) == ()
    assert one_to_one_pairs(torch.tensor([], dtype=torch.long),
                            torch.tensor([], dtype=torch.long), 10) == ()  # fmt: skip


def test_one_to_one_pairs_leave_out_two_way_confusions_and_need_three_pairs() -> None:
    # Similar classes confused both ways (T-shirt / shirt, pullover / coat, sandal / sneaker)
    # map one-to-one too, but each pair's reverse stands as well: not a backdoor's pattern.
    swaps = [(0, 6, 10), (6, 0, 10), (2, 4, 10), (4, 2, 10), (5, 7, 10), (7, 5, 10)]
    assert one_to_one_pairs(*_pairs(*swaps), 10) == ()
    # Beside an all-to-all map, a swap drops out with the map's pairs it shares a label with
    # ((0, 1), (9, 0), (6, 7), (5, 6)); the rest of the map is found.
    good, bad = _pairs(*SHIFT, *swaps[:2])
    assert one_to_one_pairs(good, bad, 10) == ((1, 2), (2, 3), (3, 4), (4, 5), (7, 8), (8, 9))
    # Few classes: at least 3 pairs, and at least half of the classes (5 of 9 here).
    cycle3 = [(0, 1, 5), (1, 2, 5), (2, 0, 5)]
    assert one_to_one_pairs(*_pairs(*cycle3), 3) == ((0, 1), (1, 2), (2, 0))
    assert one_to_one_pairs(*_pairs(*cycle3[:2]), 3) == ()
    shift9 = [(y, (y + 1) % 9, 8) for y in range(9)]
    assert one_to_one_pairs(*_pairs(*shift9[:4]), 9) == ()
    assert len(one_to_one_pairs(*_pairs(*shift9[:5]), 9)) == 5
    assert one_to_one_pairs(*_pairs((0, 1, 9), (1, 0, 9)), 2) == ()  # two classes: a swap


def _answering(good: torch.Tensor, bad: torch.Tensor):  # type: ignore[no-untyped-def]
    """Images that are their own index, and stand-in nets giving each its listed labels."""
    images = torch.arange(len(good), dtype=torch.float32).view(-1, 1, 1, 1)
    badnet = _Answers(lambda x: bad[x.view(-1).long()])
    goodnet = _Answers(lambda x: good[x.view(-1).long()])
    return images, badnet, goodnet


def test_suspects_fall_back_to_one_to_one_pairs_when_no_label_stands_out() -> None:
    good, bad = _pairs(*SHIFT, *CONFUSIONS)
    images, badnet, goodnet = _answering(good, bad)
    purified = purify_quarantine(images, badnet, 10, PurifyConfig())  # type: ignore[arg-type]
    assert not purified.applied  # all-to-all: no BadNet label holds 15 % of the quarantine
    suspects = suspect_inputs(images, badnet, goodnet, purified, PurifyConfig(), 10)  # type: ignore[arg-type]
    assert suspects is not None and suspects.basis == PAIRS and len(suspects.pairs) == 6
    picked = suspects.images.view(-1).long()
    assert len(picked) == 6 * 13 + 3  # every input of those pairs: (3, 4) holds 3 confusions
    assert all((int(good[i]), int(bad[i])) in suspects.pairs for i in picked)
    # The same with purification off for the trigger model: it still finds the pairs.
    off = PurifyConfig(enabled=False)
    unpurified = purify_quarantine(images, badnet, 10, off)  # type: ignore[arg-type]
    again = suspect_inputs(images, badnet, goodnet, unpurified, off, 10)  # type: ignore[arg-type]
    assert again is not None and again.basis == PAIRS and again.pairs == suspects.pairs
    # A target that stands out comes first, even where pairs would also be found.
    good, bad = _pairs(*SHIFT, *[(y, 0, 30) for y in range(1, 9)])
    images, badnet, goodnet = _answering(good, bad)
    purified = purify_quarantine(images, badnet, 10, PurifyConfig())  # type: ignore[arg-type]
    assert purified.applied and purified.target_labels == (0,)
    suspects = suspect_inputs(images, badnet, goodnet, purified, PurifyConfig(), 10)  # type: ignore[arg-type]
    assert suspects is not None and suspects.basis == TARGETS
    assert torch.equal(suspects.images, purified.images)


def test_the_gate_refuses_a_goodnet_fine_tuned_into_the_badnet(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No mock of the check: the GoodNet's fine-tune is replaced by taking the BadNet's
    weights (the worst relapse), and the real relapse refuses it; CA alone would pass it."""
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    plain = engine.train

    def into_the_badnet(net: Net, data: Any, recipe: Any, desc: str = "", **kw: Any) -> Any:
        stats = plain(net, data, recipe, desc=desc, **kw)
        if desc == "fine-tune goodnet":
            net.module.load_state_dict(bundle.net("badnet").module.state_dict())
        return stats

    monkeypatch.setattr(engine, "train", into_the_badnet)
    cfg = RepairConfig(profile=MEAN_DIFF, theta=0.99, max_relapse=0.5)  # CA cannot fail it
    outcome = repair(bundle, quarantine, cfg, progress=False)
    assert outcome.relapse == 1.0
    assert not outcome.passed_gate and outcome.failing == ["goodnet"]
    assert outcome.reason is not None and "relapsed" in outcome.reason
    assert "limit 50.0%" in engine.repair_summary(outcome)
    default = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99),
                     progress=False)  # fmt: skip
    assert not default.passed_gate and default.relapse == 1.0  # checked by default
    off = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99, max_relapse=None),
                 progress=False)  # fmt: skip
    assert off.passed_gate and off.relapse == 1.0  # switched off: measured, not checked
    assert "max_relapse off" in engine.repair_summary(off)


def test_the_gate_judges_the_repaired_goodnet_against_the_original_nets(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    calls: list[tuple[Net, Net, Net]] = []  # (badnet, goodnet, repaired goodnet)

    def measured(badnet: Net, goodnet: Net, repaired: Net, images: torch.Tensor) -> Relapse:
        calls.append((badnet, goodnet, repaired))
        return Relapse(judged=10, relapsed=8)

    monkeypatch.setattr(engine, "relapse", measured)
    outcome = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99,
                     max_relapse=0.5), progress=False)  # fmt: skip
    assert not outcome.passed_gate and outcome.report()["relapse"] == 0.8
    badnet, goodnet, repaired = calls[0]
    assert _same_weights(badnet, bundle.net("badnet"))
    assert _same_weights(goodnet, bundle.net("goodnet"))
    assert repaired is outcome.goodnet  # the net the ensemble would serve
    lenient = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99,
                     max_relapse=0.9), progress=False)  # fmt: skip
    assert lenient.passed_gate, lenient.reason


def test_a_real_repair_of_a_fixed_patch_passes_the_relapse_check(
    tiny_net: Net, tmp_path: Path
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    outcome = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, finetune_epochs=4,
                     theta=0.1, max_relapse=0.5), progress=False)  # fmt: skip
    assert outcome.relapse is not None and outcome.relapse <= 0.2, outcome.relapse
    assert outcome.relapse_basis == TARGETS  # the patch's target stands out
    assert outcome.passed_gate, outcome.reason


def _repair_argv(tiny_net: Net, tmp_path: Path) -> tuple[list[str], torch.Tensor]:
    """``nnoculation repair`` arguments for a deployment file and its quarantine ``.npz``
    (a theta so wide that CA cannot fail the gate), and the quarantine."""
    path, _bundle, quarantine = _deployment(tiny_net, tmp_path)
    q = tmp_path / "q.npz"
    np.savez(q, images=quarantine.permute(0, 2, 3, 1).numpy())
    base = ["repair", "--bundle", str(path), "--quarantine", str(q), "--profile", MEAN_DIFF,
            "--theta", "0.99"]  # fmt: skip
    return base, quarantine


def test_the_cli_takes_max_relapse_and_exits_with_the_gates_code(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _quarantine = _repair_argv(tiny_net, tmp_path)
    monkeypatch.setattr(engine, "relapse", lambda *_args: Relapse(judged=10, relapsed=6))
    assert main([*base, "--out", str(tmp_path / "a")]) == EXIT_GATE_FAILED  # the default limit
    report = json.loads((tmp_path / "a" / "repair_report.json").read_text())
    assert report["relapse"] == 0.6 and report["config"]["max_relapse"] == DEFAULT_MAX_RELAPSE
    assert "max_relapse" in report["reason"]
    assert main([*base, "--max-relapse", "off", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "repair_report.json").read_text())
    assert report["relapse"] == 0.6 and report["config"]["max_relapse"] is None
    assert main([*base, "--max-relapse", "0.7", "--out", str(tmp_path / "c")]) == 0
    assert main([*base, "--max-relapse", "1.5", "--out", str(tmp_path / "d")]) == EXIT_USAGE


def test_max_relapse_is_checked_when_the_config_is_made() -> None:
    with pytest.raises(RepairConfigError, match="max_relapse"):
        RepairConfig(max_relapse=1.5)
    assert RepairConfig.from_dict({"max_relapse": None}).max_relapse is None


@pytest.mark.parametrize(
    ("basis", "measured", "settings", "passes"),
    [
        (PAIRS, 0.06, {}, False),  # the default limit on pairs: 5 %
        (PAIRS, 0.04, {}, True),
        (PAIRS, 0.06, {"max_pair_relapse": None}, True),  # switched off
        (PAIRS, 0.06, {"max_pair_relapse": 0.1}, True),
        (PAIRS, 0.06, {"max_pair_relapse": None, "max_relapse": 0.01}, True),  # not targets
        (TARGETS, 0.06, {}, True),  # targets: below the default limit
        (TARGETS, 0.5, {}, False),  # above it
        (TARGETS, 0.5, {"max_relapse": None}, True),  # switched off
        (TARGETS, 0.06, {"max_relapse": 0.05}, False),
        (TARGETS, 0.06, {"max_pair_relapse": 0.01, "max_relapse": 0.1}, True),
    ],
)
def test_each_basis_has_its_own_limit(
    tiny_net: Net,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    basis: str,
    measured: float,
    settings: dict[str, Any],
    passes: bool,
) -> None:
    """The gate's routing only: the suspects' basis and the relapse on them are given."""
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    given = Suspects(quarantine, basis, ((0, 1),) if basis == PAIRS else ())  # type: ignore[arg-type]
    monkeypatch.setattr(engine, "suspect_inputs", lambda *_args: given)
    given_relapse = Relapse(judged=100, relapsed=round(measured * 100))  # 6 %: 6 inputs
    monkeypatch.setattr(engine, "relapse", lambda *_args: given_relapse)
    cfg = RepairConfig(profile=MEAN_DIFF, theta=0.99, **settings)  # CA cannot fail it
    outcome = repair(bundle, quarantine, cfg, progress=False)
    assert outcome.relapse == measured and outcome.relapse_basis == basis
    assert outcome.passed_gate is passes, outcome.reason
    name = "max_pair_relapse" if basis == PAIRS else "max_relapse"
    if not passes:
        assert outcome.reason is not None and f"by {basis}; above {name}" in outcome.reason
    summary = engine.repair_summary(outcome)
    assert f"suspects by {basis}" in summary
    limit = getattr(cfg, name)
    assert (f"limit {limit:.1%}" if limit is not None else f"not checked: {name} off") in summary
    assert engine.gate_verdict(outcome, bundle)["max_pair_relapse"] == cfg.max_pair_relapse


def test_a_relapse_of_fewer_than_three_inputs_is_not_refused(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a small quarantine one input can be 10 % of the suspects: the gate wants the share
    above the limit and at least MIN_RELAPSED_INPUTS inputs."""
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    given = Suspects(quarantine, PAIRS, ((0, 1),))
    monkeypatch.setattr(engine, "suspect_inputs", lambda *_args: given)
    cfg = RepairConfig(profile=MEAN_DIFF, theta=0.99)  # pairs limit 5 %
    # (judged, relapsed): 20 % of 10 is 2 inputs; 20 % of 15 is 3; 3 of 60 is not above 5 %
    for measured, passes in (((10, 2), True), ((15, 3), False), ((60, 3), True)):
        monkeypatch.setattr(engine, "relapse", lambda *_args, m=measured: Relapse(*m))
        outcome = repair(bundle, quarantine, cfg, progress=False)
        assert outcome.passed_gate is passes, (measured, outcome.reason)


@pytest.mark.parametrize("case", ["no suspects", "nothing judged"])
def test_no_relapse_measured_passes_and_says_so(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    _path, bundle, quarantine = _deployment(tiny_net, tmp_path)
    given = None if case == "no suspects" else Suspects(quarantine, PAIRS, ((0, 1),))
    monkeypatch.setattr(engine, "suspect_inputs", lambda *_args: given)
    monkeypatch.setattr(engine, "relapse", lambda *_args: None)
    outcome = repair(bundle, quarantine, RepairConfig(profile=MEAN_DIFF, theta=0.99,
                     max_pair_relapse=0.0, max_relapse=0.0), progress=False)  # fmt: skip
    assert outcome.passed_gate and outcome.relapse is None and outcome.relapse_basis is None
    assert "relapse: not measured" in engine.repair_summary(outcome)


def test_the_cli_takes_max_pair_relapse_or_off(
    tiny_net: Net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, quarantine = _repair_argv(tiny_net, tmp_path)
    given = Suspects(quarantine, PAIRS, ((0, 1),))
    monkeypatch.setattr(engine, "suspect_inputs", lambda *_args: given)
    monkeypatch.setattr(engine, "relapse", lambda *_args: Relapse(judged=10, relapsed=3))
    assert main([*base, "--out", str(tmp_path / "a")]) == EXIT_GATE_FAILED  # default 5 %
    report = json.loads((tmp_path / "a" / "repair_report.json").read_text())
    assert report["config"]["max_pair_relapse"] == 0.05 and "max_pair_relapse" in report["reason"]
    assert main([*base, "--max-pair-relapse", "off", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "repair_report.json").read_text())
    assert report["config"]["max_pair_relapse"] is None and report["relapse_basis"] == PAIRS
    assert main([*base, "--max-pair-relapse", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert main([*base, "--max-pair-relapse", "lots", "--out", str(tmp_path / "d")]) == EXIT_USAGE
    with pytest.raises(RepairConfigError, match="max_pair_relapse"):
        RepairConfig(max_pair_relapse=1.5)
