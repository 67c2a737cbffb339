"""From finished cells to one entry per attack (Table 5): each defense's figures per seed and
over the seeds (``median``, and ``worst``: lowest CA, highest ASR per trigger), the floor, the
Pareto front, and which NNoculation stage met the target.

The target (issue 10): ASR <= floor + 2 points for every trigger. A stage's ``worst`` verdict
holds when every seed meets it against that seed's own floor, its ``median`` verdict when the
median ASR meets the median floor; ``met_by`` names the first stage, pre-deployment alone and
then the repair, whose worst verdict holds. A verdict over fewer than 3 seeds is marked
``provisional`` (issue 10, item 1: "at least 3 seeds").

In a config with variants there is one entry per (attack, variant), each as above plus
``variant`` (and ``x``, the variant's place on the plot's x axis, when the config gives one).

The Pareto front (Table 5's bold cells) is taken per attack over the defenses' median figures,
CA up and ASR down (the worst trigger's median ASR for a multi-trigger attack); the BadNet
itself and defenses given oracle knowledge (``oracle_target``) are left out, as in the paper.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nnoculation.bench.cells import split_models
from nnoculation.bench.config import BADNET, POST, PRE

FLOOR_MARGIN = 2.0  # points of ASR above the floor that still meet the target (issue 10)
MIN_SEEDS = 3  # issue 10, item 1: every verdict over at least 3 seeds
STAGES = ((PRE, "pre-deployment"), (POST, "repair"))


class MixedCommitsError(ValueError):
    """Cells (or entries) made by more than one code commit: they may not share a file."""


def one_commit(commits: Iterable[str]) -> str:
    """The single commit all of ``commits`` name; :class:`MixedCommitsError` otherwise."""
    found = sorted(set(commits))
    if len(found) != 1:
        raise MixedCommitsError(
            f"results from {len(found)} code commits ({', '.join(found) or 'none'}) may not "
            "share a file: re-run the cells of the other commits with this code"
        )
    return found[0]


def figure(values: list[float]) -> float | list[float]:
    """One figure per trigger: a number for a single-trigger attack, else a list."""
    return values[0] if len(values) == 1 else list(values)


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``median`` and ``worst`` of CA and of each trigger's ASR over the seeds' cells."""
    asr = list(zip(*(_as_list(c["asr"]) for c in per_seed), strict=True))
    cas = [c["ca"] for c in per_seed]
    return {
        "median": {
            "ca": round(statistics.median(cas), 2),
            "asr": figure([round(statistics.median(a), 2) for a in asr]),
        },
        "worst": {"ca": min(cas), "asr": figure([max(a) for a in asr])},
    }


def _as_list(value: float | list[float]) -> list[float]:
    return value if isinstance(value, list) else [value]


def meets(asr: float | list[float], floor: float | list[float]) -> bool:
    """ASR <= floor + FLOOR_MARGIN points for every trigger."""
    return all(a <= f + FLOOR_MARGIN for a, f in zip(_as_list(asr), _as_list(floor), strict=True))


def verdict(per_seed: list[dict[str, Any]], median_floor: float | list[float]) -> dict[str, Any]:
    """A stage's target verdict per seed, on the median and on every seed (worst)."""
    each = {str(c["seed"]): meets(c["asr"], c["floor"]) for c in per_seed}
    return {
        "per_seed": each,
        "median": meets(summarise(per_seed)["median"]["asr"], median_floor),
        "worst": all(each.values()),
    }


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (CA, ASR) no other point beats: CA >= and ASR <= with one strictly."""

    def beaten(ca: float, asr: float) -> bool:
        return any((c >= ca and a <= asr) and (c > ca or a < asr) for c, a in points.values())

    return [name for name, (ca, asr) in points.items() if not beaten(ca, asr)]


def _joined(values: Iterable[str]) -> str:
    return ", ".join(sorted(set(values)))


def attack_entry(
    attack: str,
    cells: list[dict[str, Any]],
    defenses: list[str],
    seeds: list[int],
    oracle: Iterable[str] = (),
) -> dict[str, Any]:
    """Table 5's entry for ``attack`` from its cells (one per defense and seed)."""
    by_key = {(c["defense"], c["seed"]): c for c in cells}
    missing = [f"{d}/{s}" for d in defenses for s in seeds if (d, s) not in by_key]
    if missing:
        raise ValueError(f"{attack}: no cell for {', '.join(missing)}")
    floors = {}
    for s in seeds:
        seen = {tuple(by_key[(d, s)]["floor"]) for d in defenses}
        if len(seen) != 1:
            raise ValueError(f"{attack}, seed {s}: cells disagree on the floor ({sorted(seen)})")
        floors[s] = list(seen.pop())
        split = split_models(by_key[(d, s)] for d in defenses)
        if split:
            raise ValueError(
                f"{attack}, seed {s}: cells were measured on different models "
                f"({', '.join(split)}); resume the matrix so that they are measured again"
            )
    median_floor = figure(
        [round(statistics.median(f), 2) for f in zip(*floors.values(), strict=True)]
    )
    out: dict[str, Any] = {}
    for d in defenses:
        per_seed = [
            {
                "seed": s,
                "ca": by_key[(d, s)]["ca"],
                "asr": figure(by_key[(d, s)]["asr"]),
                "floor": figure(floors[s]),
                "seconds": by_key[(d, s)]["seconds"],
                "details": by_key[(d, s)]["details"],
            }
            for s in seeds
        ]
        out[d] = {"per_seed": per_seed, **summarise(per_seed)}
    candidates = [d for d in defenses if d != BADNET and d not in set(oracle)]
    front = pareto_front(
        {d: (out[d]["median"]["ca"], max(_as_list(out[d]["median"]["asr"]))) for d in candidates}
    )
    for d in defenses:
        out[d]["pareto"] = d in front
    target: dict[str, Any] = {"margin_points": FLOOR_MARGIN}
    for defense, stage in STAGES:
        if defense in out:
            target[stage] = verdict(out[defense]["per_seed"], median_floor)
    target["met_by"] = next((st for _, st in STAGES if target.get(st, {}).get("worst")), None)
    target["met_by_median"] = next(
        (st for _, st in STAGES if target.get(st, {}).get("median")), None
    )
    target["provisional"] = len(seeds) < MIN_SEEDS
    provs = [c["provenance"] for c in cells]
    return {
        "attack": attack,
        "triggers": cells[0]["triggers"],
        "commit": one_commit(p["commit"] for p in provs),
        "torch": _joined(p["torch"] for p in provs),
        "device": _joined(p["device"] for p in provs),
        "date": max(p["date"] for p in provs),
        "seeds": seeds,
        "floor": {
            "per_seed": {str(s): figure(f) for s, f in floors.items()},
            "median": median_floor,
        },
        "defenses": out,
        "pareto": front,
        "target": target,
    }


@dataclass(frozen=True)
class Row:
    """A variant as the entries see it: its name, its x (or None) and its oracle defenses."""

    variant: str
    x: float | None = None
    oracle: tuple[str, ...] = ()


def entries(
    cells: list[dict[str, Any]],
    attacks: list[str],
    defenses: list[str],
    seeds: list[int],
    oracle: Iterable[str] = (),
    variants: list[Row] | None = None,
) -> list[dict[str, Any]]:
    """One entry per attack, or per (attack, variant) in attack order then variant order when
    ``variants`` are given (their ``oracle`` replaces ``oracle``); refuses cells of more than
    one commit."""
    one_commit(c["provenance"]["commit"] for c in cells)
    if not variants:
        return [
            attack_entry(a, [c for c in cells if c["attack"] == a], defenses, seeds, oracle)
            for a in attacks
        ]
    out = []
    for a in attacks:
        for row in variants:
            mine = [c for c in cells if c["attack"] == a and c.get("variant") == row.variant]
            if not mine:
                raise ValueError(f"{a}, variant {row.variant}: no cell")
            entry = attack_entry(a, mine, defenses, seeds, row.oracle)
            x = {} if row.x is None else {"x": row.x}
            out.append({"attack": a, "variant": row.variant, **x, **entry})
    return out
