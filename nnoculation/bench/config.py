"""A bench config: the experiment matrix (attacks x defenses x seeds) as data, read from a TOML
file and checked whole before any work starts, so a misspelt key or a bad value fails at once
with its name instead of after an hour of training.

Defenses are ``badnet`` (no defense: the BadNet itself), ``nnoculation-pre`` (the deployed
ensemble after the pre-deployment search), ``nnoculation-post`` (pre-deployment, then one
repair from a simulated stream's quarantine) and every name of the defenses registry
(:mod:`nnoculation.defenses`). The optional sections override the library's defaults: ``train``
and ``splits`` the data set's recipe, ``predeploy`` the grid, ``stream`` the poison ratio and
the quarantine size, ``repair`` any :class:`~nnoculation.repair.engine.RepairConfig` setting,
``defense_options.<name>`` a registry defense's options. Seeds come from ``seeds`` and
``split`` alone (:mod:`nnoculation.bench.protocol`), so no section may set one.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nnoculation.attacks import ATTACKS
from nnoculation.bench.cells import CellKey
from nnoculation.bench.protocol import (
    MAX_CONFIG_SEED,
    SPLIT_SEEDS,
    ChainSeeds,
    Split,
    chain_seeds,
)
from nnoculation.data.sources import DATASETS
from nnoculation.data.splits import SplitConfig
from nnoculation.defenses import Defense, defense_names, get_defense
from nnoculation.predeploy import PredeployConfig
from nnoculation.recipes import Recipe, default_recipe
from nnoculation.repair.engine import RepairConfig
from nnoculation.stream import StreamConfig
from nnoculation.training import Optimizer, TrainConfig

BADNET = "badnet"
PRE = "nnoculation-pre"
POST = "nnoculation-post"
BUILTIN_DEFENSES = (BADNET, PRE, POST)
# Fields a section may not set: the protocol owns the seeds, the recipe owns alpha0.
NOT_SETTABLE = {"seed": "seeds come from `seeds` and `split` (docs/bench.md)"}
PREDEPLOY_FROM_RECIPE = {"alpha0", "optimizer"}


class ConfigError(ValueError):
    """A bench config that cannot run, named by file and key."""


def _allowed(cls: type, exclude: set[str]) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in exclude and f.name not in NOT_SETTABLE]


def _check_keys(section: str, values: dict[str, Any], allowed: list[str]) -> None:
    for key in values:
        if key in NOT_SETTABLE:
            raise ValueError(f"[{section}] {key}: {NOT_SETTABLE[key]}")
        if key not in allowed:
            raise ValueError(f"[{section}] unknown key {key!r}; allowed: {', '.join(allowed)}")


def _check_train(values: dict[str, Any]) -> None:
    """The recipe's training settings (``TrainConfig`` checks none of its own)."""
    for key in ("epochs", "batch_size"):
        v = values.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"[train] {key} must be a positive integer, got {v!r}")
    for key, positive in (("lr", True), ("weight_decay", False)):
        v = values.get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0 or (positive and v == 0):
            kind = "positive" if positive else "non-negative"
            raise ValueError(f"[train] {key} must be a {kind} number, got {v!r}")
    if values.get("optimizer", "adam") not in get_args(Optimizer):
        raise ValueError(f"[train] optimizer must be one of {', '.join(get_args(Optimizer))}")


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """TOML arrays as the tuples the library's frozen configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


class BenchConfig(BaseModel):
    """One bench matrix; see the module doc and ``docs/bench.md``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    dataset: str
    attacks: list[str] = Field(min_length=1)
    defenses: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    split: Split
    vary_badnet: bool = True
    train: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, Any] = Field(default_factory=dict)
    predeploy: dict[str, Any] = Field(default_factory=dict)
    stream: dict[str, Any] = Field(default_factory=dict)
    repair: dict[str, Any] = Field(default_factory=dict)
    defense_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS and not Path(value).exists():
            raise ValueError(
                f"unknown data set {value!r}; known: {', '.join(DATASETS.names())} "
                "(or a .npz / image folder path)"
            )
        return value

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, value: list[str]) -> list[str]:
        return _unique_known("attack", value, ATTACKS.names())

    @field_validator("defenses")
    @classmethod
    def _known_defenses(cls, value: list[str]) -> list[str]:
        return _unique_known("defense", value, [*BUILTIN_DEFENSES, *defense_names()])

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {value}")
        bad = [s for s in value if not 0 <= s <= MAX_CONFIG_SEED]
        if bad:
            raise ValueError(f"seeds must lie in [0, {MAX_CONFIG_SEED}], got {bad}")
        return value

    @model_validator(mode="after")
    def _sections(self) -> BenchConfig:
        """Build every setting once, so a bad value fails here, not in the middle of a run."""
        _check_keys("train", self.train, _allowed(TrainConfig, set()))
        _check_keys("splits", self.splits, _allowed(SplitConfig, set()))
        _check_keys("predeploy", self.predeploy, _allowed(PredeployConfig, PREDEPLOY_FROM_RECIPE))
        _check_keys("stream", self.stream, _allowed(StreamConfig, set()))
        _check_keys("repair", self.repair, _allowed(RepairConfig, set()))
        _check_train(self.train)
        for section, build in (
            ("train] / [splits", lambda: self.recipe(0)),
            ("predeploy", lambda: self.predeploy_config(self.recipe(0), 0)),
            ("stream", lambda: self.stream_config(0)),
            ("repair", lambda: self.repair_config(0)),
        ):
            try:
                build()
            except (TypeError, ValueError) as err:
                raise ValueError(f"[{section}] {err}") from None
        for name, options in self.defense_options.items():
            if name not in self.defenses or name in BUILTIN_DEFENSES:
                raise ValueError(
                    f"[defense_options.{name}] names no registry defense of this config's "
                    f"defenses ({', '.join(d for d in self.defenses if d not in BUILTIN_DEFENSES)})"
                )
            try:
                get_defense(name, **options)
            except (TypeError, ValueError) as err:
                raise ValueError(f"[defense_options.{name}] {err}") from None
        return self

    def seeds_of(self, seed: int) -> ChainSeeds:
        return chain_seeds(self.split, seed, self.vary_badnet)

    def recipe(self, badnet_seed: int) -> Recipe:
        """The data set's recipe with the overrides, the BadNet's seed and the split's seed."""
        base = default_recipe(self.dataset)
        splits = {**base.splits.to_dict(), **self.splits, "seed": SPLIT_SEEDS[self.split]}
        return base.with_(
            train=base.train.with_(**self.train, seed=badnet_seed),
            splits=SplitConfig(**splits),
        )

    def predeploy_config(self, recipe: Recipe, chain_seed: int) -> PredeployConfig:
        return PredeployConfig(
            alpha0=recipe.train.lr,
            optimizer=recipe.train.optimizer,
            seed=chain_seed,
            **_tuples(self.predeploy),
        )

    def stream_config(self, chain_seed: int) -> StreamConfig:
        return StreamConfig(seed=chain_seed, **_tuples(self.stream))

    def repair_config(self, chain_seed: int) -> RepairConfig:
        return RepairConfig.from_dict({**self.repair, "seed": chain_seed})

    def defense(self, name: str) -> Defense:
        return get_defense(name, **self.defense_options.get(name, {}))

    def oracle_defenses(self) -> list[str]:
        """Defenses given oracle knowledge (the attack's target label), which Table 5 marks
        and leaves off the Pareto front."""
        return [
            name
            for name, options in self.defense_options.items()
            if options.get("oracle_target") is not None
        ]

    def cells(self) -> list[CellKey]:
        """The plan, grouped so each (attack, seed)'s BadNet and deployment are made once."""
        return [CellKey(a, d, s) for a in self.attacks for s in self.seeds for d in self.defenses]

    def cell_settings(self, key: CellKey) -> dict[str, Any]:
        """Everything that decides a cell's figures besides the code: its hash decides whether
        a finished cell may be reused."""
        seeds = self.seeds_of(key.seed)
        recipe = self.recipe(seeds.badnet)
        settings: dict[str, Any] = {
            "dataset": self.dataset,
            "split": self.split,
            "attack": key.attack,
            "defense": key.defense,
            "seeds": asdict(seeds),
            "recipe": recipe.to_dict(),
        }
        if key.defense in (PRE, POST):
            settings["predeploy"] = self.predeploy_config(recipe, seeds.chain).to_dict()
        if key.defense == POST:
            settings["stream"] = self.stream_config(seeds.chain).to_dict()
            settings["repair"] = self.repair_config(seeds.chain).to_dict()
        if key.defense not in BUILTIN_DEFENSES:
            settings["options"] = self.defense_options.get(key.defense, {})
        return settings


def _unique_known(kind: str, value: list[str], known: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError(f"{kind}s repeat: {value}")
    unknown = [v for v in value if v not in known]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return value


def parse_config(data: dict[str, Any], source: str = "config") -> BenchConfig:
    """A validated config from parsed TOML; :class:`ConfigError` names ``source`` and the key."""
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "top level"
            problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_config(path: Path | str) -> BenchConfig:
    """Read and validate a TOML bench config."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(data, str(path))
