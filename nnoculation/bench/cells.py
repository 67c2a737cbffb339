"""Bench cells: one (attack, defense, seed) measurement, (variant, attack, defense, seed) in a
config with variants, as a JSON file, written atomically, and the rule that decides whether a
finished cell may be reused by a later run.

A cell is reused only when the running code is a clean commit (no uncommitted change to
tracked code; see :func:`nnoculation.benchmarks.common.commit`), the cell names that same
commit and its settings hash matches. Anything else is measured again, so a results file
never mixes code: "cells may resume across runs only when the same code made them"
(issue 10, item 1).

Cells of one seed share models: the BadNet (every defense), the GoodNet (pre-deployment and
the repair). A cell names the sha256 of each model it was measured on (``artifacts``). A run
that resumes cells made elsewhere (another sitting, another machine: ``nnoculation bench
--cells``) re-makes those models; where its own cells name other digests than a resumed cell
of the same group, that cell is measured again (:func:`stale`), so the cells of one seed
always describe one BadNet and one GoodNet.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.durable import write_atomic
from nnoculation.bench.attacker import fs_name
from nnoculation.benchmarks.common import cpu_model, is_clean
from nnoculation.benchmarks.common import provenance as common_provenance
from nnoculation.runtime import default_device

CELL_FORMAT = 1  # bump when a cell's meaning changes: older cells then never match


@dataclass(frozen=True)
class CellKey:
    """One point of the matrix; ``variant`` is None in a config without variants."""

    attack: str
    defense: str
    seed: int
    variant: str | None = None

    @property
    def id(self) -> str:
        """``attack/defense/seed`` (``variant/attack/defense/seed`` in a config with variants):
        what ``--only-cells`` patterns match."""
        cell = f"{self.attack}/{self.defense}/{self.seed}"
        return cell if self.variant is None else f"{self.variant}/{cell}"

    @property
    def filename(self) -> str:
        cell = f"{fs_name(self.attack)}__{self.defense}__s{self.seed}.json"
        return cell if self.variant is None else f"{self.variant}__{cell}"

    def without_variant(self) -> CellKey:
        return CellKey(self.attack, self.defense, self.seed)


@dataclass
class Measured:
    """What measuring a cell gives, in percent: CA, ASR and floor per trigger (in the same
    order), and the seconds of the defense's own offline work."""

    triggers: list[str]
    ca: float
    asr: list[float]
    floor: list[float]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # model name -> sha256


def settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps({"format": CELL_FORMAT, **settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def provenance(commit: str, settings: str) -> dict[str, Any]:
    """Who made a cell: what every result entry names (:func:`benchmarks.common.provenance`:
    commit, torch, device, CPU model and threads, date) and the settings hash."""
    device = default_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {**common_provenance(commit, f"{device.type} ({name})"), "settings_hash": settings}


def cell_record(key: CellKey, measured: Measured, commit: str, settings: str) -> dict[str, Any]:
    variant = {} if key.variant is None else {"variant": key.variant}
    return {
        **variant,
        "attack": key.attack,
        "defense": key.defense,
        "seed": key.seed,
        "triggers": measured.triggers,
        "ca": round(measured.ca, 2),
        "asr": [round(a, 2) for a in measured.asr],
        "floor": [round(f, 2) for f in measured.floor],
        "seconds": round(measured.seconds, 1),
        "details": json.loads(json.dumps(measured.details, default=str)),
        "artifacts": dict(sorted(measured.artifacts.items())),
        "provenance": provenance(commit, settings),
    }


def group(key: CellKey) -> tuple[str | None, str, int]:
    """The cells that share models: one variant, attack and seed."""
    return (key.variant, key.attack, key.seed)


def split_models(records: Iterable[dict[str, Any]]) -> list[str]:
    """The models that ``records`` name with more than one digest: cells of one group must
    agree on each model they share, or they describe different BadNets or GoodNets."""
    digests: dict[str, set[str]] = {}
    for record in records:
        for name, digest in record.get("artifacts", {}).items():
            digests.setdefault(name, set()).add(digest)
    return sorted(name for name, seen in digests.items() if len(seen) > 1)


def stale(done: dict[CellKey, dict[str, Any]], fresh: list[CellKey]) -> list[CellKey]:
    """Cells of ``done`` not in ``fresh`` that name another digest of a shared model than a
    ``fresh`` cell of their group: they were measured on models this run no longer has."""
    fresh_set = set(fresh)
    by_group: dict[tuple[str | None, str, int], list[CellKey]] = {}
    for k in fresh:
        by_group.setdefault(group(k), []).append(k)
    return [
        k
        for k in done
        if k not in fresh_set
        and any(split_models([done[k], done[f]]) for f in by_group.get(group(k), []))
    ]


def reusable(record: dict[str, Any] | None, commit: str, settings: str) -> bool:
    """The resume rule of the module doc."""
    if record is None or not is_clean(commit):
        return False
    prov = record.get("provenance", {})
    return bool(prov.get("commit") == commit and prov.get("settings_hash") == settings)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON so an interrupt leaves the old file or the new one, never half."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    write_atomic(path, lambda handle: handle.write(text))


def read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell, or None when there is none (or it cannot be read: it is re-run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def selected(key: CellKey, patterns: list[str] | None) -> bool:
    """Whether ``--only-cells`` patterns (globs over :attr:`CellKey.id`) take ``key``."""
    return patterns is None or any(fnmatch.fnmatchcase(key.id, p) for p in patterns)
