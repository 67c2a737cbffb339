"""Names, version ids and errors of the model store; light to import (no torch), so the
settings can validate a store location without loading the library."""

from __future__ import annotations

import re

DEPLOYMENT_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
VERSION_PREFIX = "v"
VERSION_DIGITS = 4
VERSION_PATTERN = re.compile(rf"^{VERSION_PREFIX}(\d{{{VERSION_DIGITS},}})$")


class StoreError(Exception):
    """Base class of model store errors."""


class InvalidNameError(StoreError, ValueError):
    """A deployment or version name that is malformed or could escape the store root."""


class UnknownDeploymentError(StoreError, KeyError):
    """The deployment has never been published to."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ActiveVersionError(StoreError):
    """The operation would remove the version that is active."""


class UnknownVersionError(StoreError, KeyError):
    """The deployment has no such version, or none is active."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RepairLockedError(StoreError):
    """Another process holds the deployment's repair lock (a repair of it is running)."""


class LockLostError(RepairLockedError):
    """This process held the deployment's repair lock and lost it (its lease ran out or another
    process took it over), so what it was doing under the lock is refused."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or refused a request (network, credentials, bucket)."""


def format_version(number: int) -> str:
    """Version id for a sequence number: 1 -> ``v0001``."""
    return f"{VERSION_PREFIX}{number:0{VERSION_DIGITS}d}"


def version_number(version: str) -> int:
    """Sequence number of a version id: ``v0001`` -> 1; ``InvalidNameError`` if malformed."""
    match = VERSION_PATTERN.match(version) if isinstance(version, str) else None
    if not match:
        raise InvalidNameError(f"invalid version id {version!r}; expected like {format_version(1)}")
    return int(match.group(1))


def check_deployment(deployment: str) -> str:
    """``deployment`` if it is a valid name (no path separators, no leading '.' or '-')."""
    if not isinstance(deployment, str) or not DEPLOYMENT_PATTERN.match(deployment):
        raise InvalidNameError(
            f"invalid deployment name {deployment!r}: use letters, digits, '_', '.', '-' "
            "and do not start with '.' or '-'"
        )
    return deployment


def next_version(numbers: list[int], at_least: str | None = None) -> str:
    """The id after every number in ``numbers`` (published and deleted), and after
    ``at_least`` if given."""
    floor = version_number(at_least) if at_least is not None else 0
    return format_version(max([floor, *numbers]) + 1)
