"""The repair benchmark's verdict: which of issue 3's targets an entry misses."""

from __future__ import annotations

from typing import Any

from nnoculation.benchmarks.repair import target_misses


def entry(asr: float | list[float], ca: float, floor: float | list[float]) -> dict[str, Any]:
    return {
        "floor": floor,
        "before": {"badnet": {"ca": 90.0, "asr": 100.0}},
        "after": {
            "ensemble": {"ca": ca, "asr": asr},
            "passed_gate": True,
            "seconds": {"cyclegan": 100.0, "finetune": 10.0},
        },
    }


def test_all_targets_met() -> None:
    assert target_misses(entry(2.5, 87.0, 0.5)) == []


def test_each_miss_is_named() -> None:
    assert target_misses(entry(2.6, 87.0, 0.5)) == ["ASR 2.6 > 2.5"]
    assert target_misses(entry(1.0, 86.9, 0.5)) == ["CA drop 3.10 > 3"]
    slow = entry(1.0, 88.0, 0.5)
    slow["after"]["seconds"] = {"cyclegan": 175.0, "finetune": 10.0}
    slow["after"]["passed_gate"] = False
    assert target_misses(slow) == ["185 s > 180 s", "gate failed"]


def test_multi_trigger_asr_is_checked_per_trigger() -> None:
    assert target_misses(entry([0.5, 4.0], 88.0, [0.2, 1.0])) == ["ASR 4.0 > 3.0"]
