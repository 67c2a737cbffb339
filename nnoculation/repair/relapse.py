"""The relapse: how often the repaired GoodNet (whose label the ensemble serves) now gives
quarantined inputs the BadNet's suspect answer, the backdoor's. It needs no labels.

Which quarantined inputs are suspect. A backdoor shows in the quarantine as a pattern in the
answers that clean disagreements do not make:

- *targets* (all-to-one, multi-target): the BadNet's answers pile up on a few labels, those
  that purification takes for targets (:mod:`nnoculation.repair.purify`); the suspects are the
  inputs the BadNet gives one of them;
- *one-to-one pairs* (all-to-all: class y is sent to its own target, y + 1): no BadNet label
  stands out, but the (GoodNet label, BadNet label) pairs of the disagreeing inputs do, and
  they form a one-to-one map over many classes: each pair holds at least 1/(2K) of the
  disagreements (and 2 inputs), no other standing pair has the same GoodNet label or the same
  BadNet label, and its reverse (b, g) does not stand. Clean disagreements make other patterns:
  several classes confused with one (shirt, pullover and T-shirt answers piled on one label),
  one class with several, or two similar classes with each other both ways (T-shirt and
  shirt), so their standing pairs collide and are left out. The suspects are the inputs in the
  pairs that remain, when there are at least 3 of them and they map at least half of the
  classes. (A backdoor whose map swaps two classes is missed: the rule prefers not measuring to
  measuring clean confusions.)

Why the second kind exists. Without it the relapse was not measured on all-to-all, and one
repair of that row (``docs/results/table5-all-to-all.md``, seed 2) passed the gate and raised
the deployed ASR from 0.7 to 8.4 %: its GoodNet had taken up the backdoor's y + 1 answers
(re-made with this basis, the same repair relapsed on 8.8 % of its pairs and was refused). The
thresholds follow from the attack's structure (a one-to-one backdoor over K classes gives each
pair about 1/K of its share of the quarantine: a pair stands out at half of that, 1/(2K)), not
from a search. The label patterns of the tests (``tests/test_relapse_gate.py``) are modelled on a
re-made all-to-all quarantine of report seed 2 and of a stream of that deployment with no
attack (looked at once, by hand; the committed calibration is the tuning run below).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final, Literal

import torch

from models.nets import Net
from nnoculation.repair.purify import Purified, PurifyConfig, purify_quarantine

TARGETS: Final = "targets"
PAIRS: Final = "one-to-one pairs"
Basis = Literal["targets", "one-to-one pairs"]
MIN_PAIR_INPUTS = 2  # a pair of one input is no pattern
# The gate's default limit on the relapse by target labels (``RepairConfig.max_relapse``).
# Chosen on the tuning split (configs/tuning-relapse-ratio.toml: the patch and the moving patch,
# 3 seeds, streams with no attack and with 1, 5 and 20 % poison, pre-deployment beside each
# repair so that its harm shows; docs/results/tuning-relapse-ratio.md, at 3905bc8). The rule:
# the midpoint between the largest relapse of a repair of an attacked stream (>= 5 % poison:
# these must pass) and the smallest of a repair that reinstated the backdoor (served ASR more
# than 5 points above pre-deployment's: these must be refused), rounded down to 5 points. It was
# set while the run was under way: the rounding after the moving patch's seed 0, the 5-point
# line after the patch's seed 0 at 20 % poison (+2.6 points at an 11.2 % relapse, which no
# limit can refuse without refusing repairs of attacked streams). Measured: attacked 2.6-38.0 %
# (the patch at 5 %: 25.4 / 38.0 / 29.4); reinstating 46.3-52.0 % (the moving patch with no
# attack or 1 % poison, +12.7 to +38.6 points); midpoint 42.1, so 40 %. The margin is thin on
# the attacked side (2 points). The patch's repairs of streams with little or no attack fell on
# both sides (37.6-59.3 %, changing the ASR by -4.5 to +2.5 points): the limit refuses most of
# them, and a refused repair keeps serving the nets that were there.
# tests/test_relapse_default.py holds the committed run to the rule.
DEFAULT_MAX_RELAPSE = 0.4
# The gate's default limit on the relapse by one-to-one pairs (``RepairConfig.max_pair_relapse``).
# Chosen on the tuning split
# (configs/tuning-relapse-all-to-all.toml, 3 seeds, quarantines of N = 200): healthy repairs of
# all-to-all streams stayed at or below 1.1 %, and streams with no attack never gave pairs (the
# relapse there was measured on targets or not at all). The few clean inputs that share a
# backdoor pair, on which the BadNet is often right, can explain a few points. One harmful
# repair has been measured on this basis since (docs/results/table5-all-to-all.md, report seed
# 2: 8.8 %, refused) beside healthy ones at 0.8 and 2.6 %: the limit is a margin above healthy
# repairs that the one harmful repair cleared by less than 4 points, not a wide separation.
DEFAULT_MAX_PAIR_RELAPSE = 0.05
# The gate refuses a relapse above its limit only when it is at least this many inputs: on a
# small quarantine (an early repair asked for by an operator) one input can be 10 % of the
# suspects, and one or two inputs are within what clean suspects explain.
MIN_RELAPSED_INPUTS = 3
MIN_PAIRS = 3  # with few classes, half of them is too few pairs to be a pattern


@dataclass(frozen=True)
class Suspects:
    """The quarantined inputs whose BadNet answer looks like the backdoor's, and why."""

    images: torch.Tensor
    basis: Basis
    pairs: tuple[tuple[int, int], ...] = ()  # (GoodNet label, BadNet label), for PAIRS


def one_to_one_pairs(
    goodnet_labels: torch.Tensor, badnet_labels: torch.Tensor, num_classes: int
) -> tuple[tuple[int, int], ...]:
    """The (GoodNet, BadNet) label pairs of the disagreeing inputs that stand out (at least
    1/(2K) of them, K = ``num_classes``, and 2) and collide with no other standing pair (same
    GoodNet label, same BadNet label, or the reverse pair), when at least
    max(3, ceil(K/2)) remain; else ``()``."""
    disagree = goodnet_labels != badnet_labels
    g, b = goodnet_labels[disagree].tolist(), badnet_labels[disagree].tolist()
    counts: dict[tuple[int, int], int] = {}
    for pair in zip(g, b, strict=True):
        counts[pair] = counts.get(pair, 0) + 1
    least = max(MIN_PAIR_INPUTS, math.ceil(len(g) / (2 * num_classes)))
    standing = {p for p, n in counts.items() if n >= least}
    sources = [p[0] for p in standing]
    targets = [p[1] for p in standing]
    lone = sorted(
        p
        for p in standing
        if sources.count(p[0]) == 1 and targets.count(p[1]) == 1 and (p[1], p[0]) not in standing
    )
    return tuple(lone) if len(lone) >= max(MIN_PAIRS, math.ceil(num_classes / 2)) else ()


def suspect_inputs(
    quarantine: torch.Tensor,
    badnet: Net,
    goodnet: Net,
    purified: Purified,
    purify: PurifyConfig,
    num_classes: int,
) -> Suspects | None:
    """The suspects of the module doc (targets first, whether or not purification is on for
    the trigger model; else one-to-one pairs), or ``None`` when the answers show neither."""
    if purified.applied:
        return Suspects(purified.images, TARGETS)
    if not purify.enabled:  # purification did not look: look now, with its thresholds
        standing = purify_quarantine(quarantine, badnet, num_classes, replace(purify, enabled=True))
        if standing.applied:
            return Suspects(standing.images, TARGETS)
    bad, good = badnet.predict(quarantine), goodnet.predict(quarantine)
    pairs = one_to_one_pairs(good, bad, num_classes)
    if not pairs:
        return None
    keep = torch.zeros(len(quarantine), dtype=torch.bool)
    for g, b in pairs:
        keep |= (good == g) & (bad == b)
    return Suspects(quarantine[keep], PAIRS, pairs)


@dataclass(frozen=True)
class Relapse:
    """What the relapse measured: of ``judged`` suspects (those on which the GoodNet did not
    give the BadNet's answer before the repair), ``relapsed`` now get it from the repaired
    GoodNet."""

    judged: int
    relapsed: int

    @property
    def share(self) -> float:
        return self.relapsed / self.judged


def relapse(badnet: Net, goodnet: Net, repaired: Net, images: torch.Tensor) -> Relapse | None:
    """Of ``images`` on which the GoodNet did not give the BadNet's answer before the repair,
    how many the repaired GoodNet (whose label the ensemble serves) now gives it: a share near
    0 for a repair that unlearned the backdoor, large for one that taught the GoodNet the
    backdoor's answers. ``None`` when the GoodNet already agreed on every one of them."""
    suspect = badnet.predict(images)
    disagreed = goodnet.predict(images) != suspect
    judged = int(disagreed.sum())
    if judged == 0:
        return None
    relapsed = int((repaired.predict(images[disagreed]) == suspect[disagreed]).sum())
    return Relapse(judged, relapsed)
