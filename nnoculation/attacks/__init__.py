"""The attack suite (sec. 4.1, sec. 6.1): triggers, attack specifications and their catalog.

Evaluation only: benchmarks, the demo and tests build BadNets with these attacks; the defense
never imports this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnoculation.attacks.catalog import ATTACKS
from nnoculation.attacks.spec import AttackSpec, TargetRule, Trigger
from nnoculation.attacks.triggers import TRIGGERS, apply_trigger, combine_params


def get_attack(name: str, num_classes: int, shape: tuple[int, int, int]) -> AttackSpec:
    """The catalog attack ``name`` for ``num_classes`` classes of ``(C, H, W)`` images."""
    return ATTACKS.get(name)(num_classes, tuple(shape))  # type: ignore[arg-type]


def attack_from_dict(data: Mapping[str, Any]) -> AttackSpec:
    """Rebuild an :class:`AttackSpec` from its ``to_dict()`` form (e.g. a report's JSON)."""
    return AttackSpec.from_dict(data)


__all__ = [
    "ATTACKS",
    "TRIGGERS",
    "AttackSpec",
    "TargetRule",
    "Trigger",
    "apply_trigger",
    "attack_from_dict",
    "combine_params",
    "get_attack",
]
