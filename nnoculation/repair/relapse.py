"""The relapse: how often the repaired GoodNet (whose label the ensemble serves) now gives
quarantined inputs the BadNet's suspect answer, the backdoor's. It needs no labels.

Which quarantined inputs are suspect. A backdoor shows in the quarantine as a pattern in the
answers that clean disagreements do not make:

- *targets* (all-to-one, multi-target): the BadNet's answers pile up on a few labels, those
  that purification takes for targets (:mod:`nnoculation.repair.purify`); the suspects are the
  inputs the BadNet gives one of them;
- *one-to-one pairs* (all-to-all: class y is sent to its own target, y + 1): no BadNet label
  stands out, but the (GoodNet label, BadNet label) pairs do, and they form a one-to-one map
  over many classes: each pair holds a share of the quarantine and no other standing pair
  shares its GoodNet label or its BadNet label. Clean disagreements make a different pattern:
  several classes confused with one (shirt, pullover and T-shirt answers piled on one label) or
  one class with several, so their standing pairs collide and are left out. The suspects are
  the inputs in the pairs that remain, when they map at least half of the classes.

Why the second kind exists. Without it the relapse was not measured on all-to-all, and one
repair of that row (``docs/results/table5-all-to-all.md``, seed 2) passed the gate and raised
the deployed ASR from 0.7 to 8.4 %: its GoodNet had taken up the backdoor's y + 1 answers. The
thresholds follow from the attack's structure (a one-to-one backdoor over K classes gives each
pair about 1/K of its share of the quarantine: a pair stands out at half of that, 1/(2K)), not
from a search; the rule was checked on one re-made all-to-all quarantine of report seed 2
(``configs/table5-all-to-all.toml``, 129 of its 200 inputs triggered), where it kept 8 pairs
holding 94 triggered and 5 clean inputs, and on a stream of that deployment with no attack,
where every standing pair collided (no suspects). The harmful repair itself did not recur when
that seed's chain was re-made on another CPU (six repairs with different repair seeds left the
deployed ASR at 0.34-0.52 %), so the check has not yet been seen on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from models.nets import Net
from nnoculation.repair.purify import Purified, PurifyConfig, purify_quarantine

TARGETS = "targets"
PAIRS = "one-to-one pairs"


@dataclass(frozen=True)
class Suspects:
    """The quarantined inputs whose BadNet answer looks like the backdoor's, and why."""

    images: torch.Tensor
    basis: str  # TARGETS or PAIRS
    pairs: tuple[tuple[int, int], ...] = ()  # (GoodNet label, BadNet label), for PAIRS


def one_to_one_pairs(
    goodnet_labels: torch.Tensor, badnet_labels: torch.Tensor, num_classes: int
) -> tuple[tuple[int, int], ...]:
    """The (GoodNet, BadNet) label pairs of disagreeing inputs that stand out (at least 1/(2K)
    of them, K = ``num_classes``) and share neither label with another standing pair, when at
    least half of the classes are so mapped; else ``()``."""
    disagree = goodnet_labels != badnet_labels
    g, b = goodnet_labels[disagree].tolist(), badnet_labels[disagree].tolist()
    if not g:
        return ()
    counts: dict[tuple[int, int], int] = {}
    for pair in zip(g, b, strict=True):
        counts[pair] = counts.get(pair, 0) + 1
    least = max(2, math.ceil(len(g) / (2 * num_classes)))
    standing = [p for p, n in counts.items() if n >= least]
    sources = [p[0] for p in standing]
    targets = [p[1] for p in standing]
    lone = sorted(p for p in standing if sources.count(p[0]) == 1 and targets.count(p[1]) == 1)
    return tuple(lone) if len(lone) >= math.ceil(num_classes / 2) else ()


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


def relapse(badnet: Net, goodnet: Net, repaired: Net, images: torch.Tensor) -> float | None:
    """Of ``images`` on which the GoodNet did not give the BadNet's answer before the repair,
    the share on which the repaired GoodNet (whose label the ensemble serves) now does: near 0
    for a repair that unlearned the backdoor, large for one that taught the GoodNet the
    backdoor's answers. ``None`` when the GoodNet already agreed on every one of them."""
    suspect = badnet.predict(images)
    disagreed = goodnet.predict(images) != suspect
    if not bool(disagreed.any()):
        return None
    return float((repaired.predict(images[disagreed]) == suspect[disagreed]).float().mean())
