"""The bench's attackers beyond the catalog's names: a noise-trained version of any catalog
attack (``adaptive:<name>``, the adaptive attacker of sec. 5.4 / Table 7 applied to that
attack) and the strength of the noise a noise-trained attacker trains with
(``attacker_noise``), both from a bench config alone, without a new catalog entry.

``adaptive:<name>`` is the catalog attack ``<name>`` with ``noise_train = True``: the attacker
appends a noise-augmented copy of its poisoned training set, exactly as the catalog's
``adaptive`` (the ``patch`` attack trained so) does, and the clean reference model behind the
floor is trained the same way (:meth:`AttackSpec.clean_training_set`). ``adaptive:patch`` is
the catalog's ``adaptive`` under another name.

``attacker_noise`` sets how strongly a noise-trained attacker trains with noise: ``gammas``,
the noise levels (share of pixels replaced, as the defender's gammas) it draws one of per
image, by default the catalog's :data:`~nnoculation.attacks.spec.ADAPTIVE_GAMMAS` (the
defender's grid, 10 % to 60 %), and ``share``, the fraction of its training set that gets a
noisy copy (default 1: all of it; 0: none, the plain attack). At the default strength the
catalog's own code makes the training sets; any other strength is :class:`NoiseTrainedAttack`,
whose noisy copy uses the same poisoned set (the same poisoned subset and triggers per seed)
and a generator of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import Any

import torch

from nnoculation.attacks import ATTACKS, AttackSpec, get_attack
from nnoculation.attacks.spec import ADAPTIVE_GAMMAS
from nnoculation.data.imageset import ImageSet
from nnoculation.noise import generator_for, noise_augment

NOISE_PREFIX = "adaptive:"
NOISE_KEYS = ("gammas", "share")
# Salt for the generator of a non-default strength's noisy copy (the poisoning keeps ``seed``).
NOISE_SALT = 0x5EED_0F_A77AC4


def base_name(attack: str) -> str:
    """The catalog attack behind ``attack`` (``adaptive:tca`` -> ``tca``)."""
    return attack.removeprefix(NOISE_PREFIX)


def fs_name(attack: str) -> str:
    """``attack`` as a file or folder name (``adaptive:tca`` -> ``adaptive+tca``)."""
    return attack.replace(":", "+")


def known_attacks() -> list[str]:
    """Catalog names, and ``adaptive:<name>`` for each catalog attack not noise-trained."""
    return [*ATTACKS.names(), *(NOISE_PREFIX + n for n in ATTACKS.names() if not _noised(n))]


@cache
def _noised(catalog_name: str) -> bool:
    return get_attack(catalog_name, 10, (1, 28, 28)).noise_train


def noise_trained(attack: str) -> bool:
    """Whether ``attack`` (a name :func:`known_attacks` lists) trains with noise itself."""
    return attack.startswith(NOISE_PREFIX) or _noised(attack)


@dataclass(frozen=True)
class AttackerNoise:
    """How strongly a noise-trained attacker trains with noise (see the module doc)."""

    gammas: tuple[float, ...] = ADAPTIVE_GAMMAS
    share: float = 1.0

    def __post_init__(self) -> None:
        gammas = self.gammas
        if not gammas or any(
            isinstance(g, bool) or not isinstance(g, int | float) or not 0 < g <= 1 for g in gammas
        ):
            raise ValueError(f"gammas must be a non-empty list in (0, 1], got {list(gammas)}")
        share = self.share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
            raise ValueError(f"share must lie in [0, 1], got {share!r}")
        object.__setattr__(self, "gammas", tuple(float(g) for g in gammas))
        object.__setattr__(self, "share", float(share))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttackerNoise:
        unknown = [k for k in data if k not in NOISE_KEYS]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; allowed: {', '.join(NOISE_KEYS)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            values[key] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    @property
    def is_default(self) -> bool:
        return self == AttackerNoise()

    def to_dict(self) -> dict[str, Any]:
        return {"gammas": list(self.gammas), "share": self.share}


@dataclass(frozen=True)
class NoiseTrainedAttack(AttackSpec):
    """A noise-trained attack at a strength other than the catalog's (module doc)."""

    noise: AttackerNoise = field(default_factory=AttackerNoise)

    def poison_training_set(self, train: ImageSet, seed: int) -> ImageSet:
        poisoned = AttackSpec.poison_training_set(self._plain(), train, seed)
        return self._with_noisy_copy(poisoned, seed)

    def clean_training_set(self, train: ImageSet, seed: int) -> ImageSet:
        return self._with_noisy_copy(train, seed)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "attacker_noise": self.noise.to_dict()}

    def _plain(self) -> AttackSpec:
        """The same attack without noise training, as a catalog spec."""
        values = {f.name: getattr(self, f.name) for f in fields(AttackSpec)}
        return AttackSpec(**{**values, "noise_train": False})

    def _with_noisy_copy(self, data: ImageSet, seed: int) -> ImageSet:
        count = round(self.noise.share * len(data))
        if count == 0:
            return data
        g = generator_for(seed ^ NOISE_SALT, data.images.device)
        pick = torch.randperm(len(data), generator=g, device=g.device)[:count].sort().values
        chosen = data.subset(pick.cpu())
        level = torch.randint(len(self.noise.gammas), (count,), generator=g, device=g.device)
        noisy = chosen.images.clone()
        for i, gamma in enumerate(self.noise.gammas):
            idx = (level.to(noisy.device) == i).nonzero().squeeze(1)
            if idx.numel():
                noisy[idx] = noise_augment(chosen.images[idx], gamma, g)
        return ImageSet.concat([data, chosen.with_images(noisy)])


def attack_spec(
    attack: str, num_classes: int, shape: tuple[int, int, int], noise: AttackerNoise
) -> AttackSpec:
    """The spec ``attack`` names, at the noise strength ``noise`` when it is noise-trained."""
    spec = get_attack(base_name(attack), num_classes, shape)
    if not noise_trained(attack):
        return spec
    spec = replace(
        spec,
        name=attack,
        noise_train=True,
        description=spec.description
        + ("" if spec.noise_train else "; the attacker also trains on noise-augmented data"),
    )
    if noise.is_default:
        return spec
    values = {f.name: getattr(spec, f.name) for f in fields(AttackSpec)}
    return NoiseTrainedAttack(**values, noise=noise)
