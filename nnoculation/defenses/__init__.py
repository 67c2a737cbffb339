"""Defenses compared with NNoculation (issue 10): one module each, registered by name.

Import a defense's module to register it; :func:`get_defense` looks it up by name.
"""

from nnoculation.defenses.base import (
    REJECTED,
    Defended,
    Defense,
    DefenseInputs,
    Rejecting,
    defense_names,
    get_defense,
    register,
)

__all__ = [
    "REJECTED",
    "Defended",
    "Defense",
    "DefenseInputs",
    "Rejecting",
    "defense_names",
    "get_defense",
    "register",
]
