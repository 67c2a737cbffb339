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
``validation_share`` gives the defender that share of its validation set (Table 9) and
``attacker_noise`` sets how strongly a noise-trained attacker (``adaptive``,
``adaptive:<name>``; :mod:`nnoculation.bench.attacker`) trains with noise.

``variants`` (optional) are named override sets of those sections, each merged over the top
level and checked whole with it: a cell is then (variant, attack, defense, seed). Without
variants a config's cells, their file names and settings hashes, and its results are what
they were before variants existed.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from nnoculation.bench.attacker import AttackerNoise, known_attacks, noise_trained
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
# What a variant may override: the sections (merged key by key over the top level's) and
# the two scalars below. The attacker's side is ``train``, ``splits`` (the attacker's set and
# the test pool the floor is measured on) and ``attacker_noise``; the rest is the defender's.
SECTIONS = ("train", "splits", "predeploy", "stream", "repair", "attacker_noise")
# Fields added with variants: left out of a config's dump while at their defaults, so the
# results of a config without them read as they did before.
NEW_FIELDS: dict[str, Any] = {
    "validation_share": 1.0,
    "attacker_noise": {},
    "x_label": None,
    "variants": [],
}


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


class Sections(BaseModel):
    """The override sections: what a config sets over the library's defaults, and what a
    variant sets over its config's (merged key by key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, Any] = Field(default_factory=dict)
    predeploy: dict[str, Any] = Field(default_factory=dict)
    stream: dict[str, Any] = Field(default_factory=dict)
    repair: dict[str, Any] = Field(default_factory=dict)
    attacker_noise: dict[str, Any] = Field(default_factory=dict)
    defense_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


class Variant(Sections):
    """A named override set: the top level's sections with these keys merged over them."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    x: float | None = None  # the variant's place on the plot's x axis (e.g. a poison ratio)
    # None: the config's share (a config's own default is the whole set, 1.0)
    validation_share: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            name = data.get("name", "?")
            for key in data:
                if key not in VARIANT_KEYS:
                    raise ValueError(
                        f"variant {name!r}: unknown key {key!r}; allowed: {', '.join(VARIANT_KEYS)}"
                    )
        return data

    @field_validator("x")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"x must be a finite number, got {value}")
        return value


VARIANT_KEYS = tuple(Variant.model_fields)  # named in the message for an unknown key


class BenchConfig(Sections):
    """One bench matrix; see the module doc and ``docs/bench.md``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    dataset: str
    attacks: list[str] = Field(min_length=1)
    defenses: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    split: Split
    vary_badnet: bool = True
    validation_share: float = Field(default=1.0, gt=0, le=1)
    x_label: str | None = None
    variants: list[Variant] = Field(default_factory=list)
    _flat: dict[str, BenchConfig] = PrivateAttr(default_factory=dict)

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
        return _unique_known(
            "attack", value, known_attacks(), "; or adaptive:<name>, <name> trained with noise"
        )

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
        try:
            noise = self.noise()
        except (TypeError, ValueError) as err:
            raise ValueError(f"[attacker_noise] {err}") from None
        if not noise.is_default and not any(noise_trained(a) for a in self.attacks):
            raise ValueError(
                "[attacker_noise] applies to noise-trained attacks (adaptive, "
                "adaptive:<name>) and this config has none"
            )
        self._check_variants()
        return self

    def _check_variants(self) -> None:
        """Each variant merged over the top level and checked whole, as a config of its own."""
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"[variants] names repeat: {names}")
        with_x = [v.name for v in self.variants if v.x is not None]
        if with_x and len(with_x) != len(names):
            raise ValueError(
                f"[variants] x: give every variant an x or none (only {', '.join(with_x)} has one)"
            )
        if self.x_label is not None and not with_x:
            raise ValueError("x_label names the x axis of variants with an x, and none has one")
        for v in self.variants:
            try:
                self._flat[v.name] = BenchConfig.model_validate(self._merged(v))
            except ValidationError as err:
                problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
                raise ValueError(f"[variants.{v.name}] {problems}") from None

    def _merged(self, v: Variant) -> dict[str, Any]:
        data = self.model_dump(exclude={"variants", "x_label"})
        for section in SECTIONS:
            data[section] = {**data[section], **getattr(v, section)}
        options = dict(data["defense_options"])
        for name, values in v.defense_options.items():
            options[name] = {**options.get(name, {}), **values}
        data["defense_options"] = options
        if v.validation_share is not None:
            data["validation_share"] = v.validation_share
        return data

    def variant_config(self, name: str | None) -> BenchConfig:
        """The config a variant's cells run with (the top level itself for ``None``)."""
        if name is None:
            return self
        if name not in self._flat:
            raise KeyError(f"{self.name!r} has no variant {name!r}")
        return self._flat[name]

    def dump(self) -> dict[str, Any]:
        """The config as data (what a results file records); the fields added with variants
        only when set, so a config without them dumps as before."""
        data = self.model_dump()
        data["variants"] = [v.model_dump(exclude_defaults=True) for v in self.variants]
        for key, default in NEW_FIELDS.items():
            if data[key] == default:
                del data[key]
        return data

    def noise(self) -> AttackerNoise:
        """The noise-trained attackers' strength (the catalog's by default)."""
        return AttackerNoise.from_dict(self.attacker_noise)

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

    def variant_names(self) -> list[str | None]:
        """The variants' names in order, or ``[None]`` for a config without variants."""
        return [v.name for v in self.variants] or [None]

    def cells(self) -> list[CellKey]:
        """The plan, grouped so each (attack, seed)'s BadNet and deployment are made once
        (variants that share them follow each other)."""
        return [
            CellKey(a, d, s, v)
            for a in self.attacks
            for s in self.seeds
            for v in self.variant_names()
            for d in self.defenses
        ]

    def attacker_settings(self, attack: str) -> dict[str, Any]:
        """What, besides the recipe and the split, decides the attacker's BadNet: the noise
        strength of a noise-trained attack, when not the catalog's (else nothing, so the
        settings of configs that never set it are unchanged)."""
        noise = self.noise()
        if noise_trained(attack) and not noise.is_default:
            return {"attacker_noise": noise.to_dict()}
        return {}

    def cell_settings(self, key: CellKey) -> dict[str, Any]:
        """Everything that decides a cell's figures besides the code: its hash decides whether
        a finished cell may be reused. A variant's cell has its variant's settings; the
        variant's name and ``x`` are labels, not settings."""
        if key.variant is not None:
            return self.variant_config(key.variant).cell_settings(key.without_variant())
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
        settings |= self.attacker_settings(key.attack)
        if key.defense != BADNET and self.validation_share != 1.0:
            settings["validation_share"] = self.validation_share
        return settings


def _unique_known(kind: str, value: list[str], known: list[str], also: str = "") -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError(f"{kind}s repeat: {value}")
    unknown = [v for v in value if v not in known]
    if unknown:
        listed = [k for k in known if ":" not in k]
        raise ValueError(
            f"unknown {kind}(s) {', '.join(unknown)}; known: {', '.join(listed)}{also}"
        )
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
