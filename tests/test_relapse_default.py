"""The gate's default limit on targets against the committed tuning run it was chosen on: it must
pass every repair of an attacked stream that the run measured and refuse every repair that
reinstated the backdoor (served ASR well above what pre-deployment had left). A changed default,
or a re-made run whose repairs no longer separate, fails here rather than in a deployment."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from nnoculation.bench.output import worst_asr
from nnoculation.repair.relapse import DEFAULT_MAX_RELAPSE, TARGETS

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# points of served ASR above pre-deployment's at which a repair counts as having reinstated
# the backdoor: what the limit is for. Smaller harms happen at relapses healthy repairs also
# reach (the patch at 20 % poison, seed 0: +2.6 points at an 11.2 % relapse), so no limit on
# the relapse can refuse them without refusing repairs of attacked streams
HARM_POINTS = 5.0
# the streams whose repairs the limit must pass: an attack in at least this share of the stream
ATTACKED = 0.05


def repairs(path: Path) -> list[dict[str, Any]]:
    """Every measured repair of a committed bench result: its variant's poison ratio, the
    relapse and its basis, whether it passed the gate, and its harm: the served ASR's points
    above the same seed's pre-deployment (worst trigger; a gated repair serves what was there,
    so harm is judged on repairs that passed)."""
    data = json.loads(path.read_text())
    out = []
    for entry in data["entries"]:
        pre = {r["seed"]: worst_asr(r) for r in entry["defenses"]["nnoculation-pre"]["per_seed"]}
        for r in entry["defenses"]["nnoculation-post"]["per_seed"]:
            details = r["details"]
            out.append(
                {
                    "cell": f"{entry.get('variant')}/{entry['attack']}/{r['seed']}",
                    "poison": entry["x"],
                    "relapse": details.get("relapse"),
                    "basis": details.get("relapse_basis"),
                    "passed": details.get("passed_gate"),
                    "harm": worst_asr(r) - pre[r["seed"]],
                }
            )
    return out


def test_the_default_limit_on_targets_separates_the_tuning_runs_repairs() -> None:
    measured = [r for r in repairs(RESULTS / "tuning-relapse-ratio.json") if r["basis"] == TARGETS]
    attacked = [r for r in measured if r["poison"] >= ATTACKED]
    harmful = [r for r in measured if r["passed"] and r["harm"] > HARM_POINTS]
    assert attacked and harmful  # the run measured both kinds
    for r in attacked:
        assert r["relapse"] / 100 <= DEFAULT_MAX_RELAPSE, r
    for r in harmful:
        assert r["relapse"] / 100 > DEFAULT_MAX_RELAPSE, r
    # the rule it was chosen by (nnoculation/repair/relapse.py): the gap's midpoint, rounded
    # down to 5 points
    midpoint = (max(r["relapse"] for r in attacked) + min(r["relapse"] for r in harmful)) / 2
    assert 5 * math.floor(midpoint / 5) == pytest.approx(DEFAULT_MAX_RELAPSE * 100)


@pytest.mark.parametrize("harm", [5.0, -2.0])
def test_harm_is_read_against_the_same_seeds_pre_deployment(harm: float, tmp_path: Path) -> None:
    entry = {
        "attack": "patch",
        "variant": "v",
        "x": 0.2,
        "defenses": {
            "nnoculation-pre": {"per_seed": [{"seed": 3, "asr": [4.0, 1.0]}]},
            "nnoculation-post": {
                "per_seed": [{"seed": 3, "asr": [1.0, 4.0 + harm], "details": {"relapse": 9.0}}]
            },
        },
    }
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"entries": [entry]}))
    (r,) = repairs(path)
    assert r["harm"] == harm and r["relapse"] == 9.0 and r["cell"] == "v/patch/3"
