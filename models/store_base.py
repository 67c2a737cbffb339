"""What every model store backend shares: names, errors and the :class:`BundleStore` interface.

A store holds versioned bundles per deployment, an active pointer, and a repair lock. The
backends (:class:`models.store.ModelStore`, a local directory; :class:`models.s3_store.S3Store`,
S3-compatible object storage) keep the same guarantees: a version is published whole or not
at all, every bundle is checked against its manifest's sha256 before it is used, the active
pointer moves atomically, and a version id is never given out twice (not even after a delete).

*Rejected candidates*: a repair refused by the validation gate keeps its nets as a version
whose manifest's ``provenance["candidate"]`` says so (:func:`rejected_candidate`), so they can
be evaluated. Such a version is never activated: :meth:`BundleStore.activate` refuses it
(:class:`RejectedCandidateError`), :meth:`BundleStore.rollback` skips it when it picks the
target itself, and the only way to serve its nets is :meth:`BundleStore.activate_override`,
which publishes a copy whose provenance records who overrode the gate, when and why, and
activates the copy (bundles are immutable, so the candidate itself is never changed).
:func:`models.store_open.open_store` picks the backend from a location string; the names
and errors are in :mod:`models.store_names`.
"""

from __future__ import annotations

import abc
import shutil
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

from models.bundle import (
    Bundle,
    Manifest,
    read_manifest,
    utc_now_iso,
    verify_bundle,
    write_manifest,
)
from models.store_names import StoreError, UnknownVersionError, version_number

# Publishers that lose the race for a version id retry with the next one this many times.
MAX_PUBLISH_ATTEMPTS = 100
# cleanup() leaves younger leftovers alone: they may belong to a publish still running.
DEFAULT_STALE_TMP_SECONDS = 3600.0


# provenance keys: a rejected candidate's gate verdict, and an override copy's record.
CANDIDATE_KEY = "candidate"
OVERRIDE_KEY = "override"
REJECTED = "rejected"
MAX_OVERRIDE_REASON = 500
OVERRIDE_SOURCES = ("admin", "cli")


class RejectedCandidateError(StoreError):
    """The version is a rejected candidate (its repair failed the validation gate): it is
    never activated as it is, only through :meth:`BundleStore.activate_override`."""


def rejected_candidate(manifest: Manifest) -> dict[str, Any] | None:
    """The gate's verdict recorded in a rejected candidate's provenance (``reason``,
    ``holdout_ca``, ``theta``, ...), or None for a version that may be activated."""
    record = manifest.provenance.get(CANDIDATE_KEY)
    if isinstance(record, dict) and record.get("status") == REJECTED:
        return record
    return None


def check_activatable(manifest: Manifest) -> None:
    """:class:`RejectedCandidateError` when ``manifest`` is a rejected candidate's."""
    record = rejected_candidate(manifest)
    if record is not None:
        raise RejectedCandidateError(
            f"{manifest.version} is a rejected candidate (its repair failed the validation "
            f"gate: {record.get('reason')}); it is never activated as it is: override the gate "
            "explicitly with a reason to activate a recorded copy of it"
        )


def check_override_reason(reason: object) -> str:
    """The override reason stripped: ``ValueError`` unless it is 1 to 500 characters of text."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("an override needs a reason: say why the gate's verdict is overruled")
    text = reason.strip()
    if len(text) > MAX_OVERRIDE_REASON:
        raise ValueError(
            f"the override reason is {len(text)} characters long; at most {MAX_OVERRIDE_REASON}"
        )
    return text


Build = Callable[[Path, str], Manifest]
"""``build(tmp_dir, version)`` writes a bundle for ``version`` into ``tmp_dir`` and returns its
manifest (usually :func:`models.bundle.write_bundle`)."""


class BundleStore(abc.ABC):
    """The model store interface the API, the worker and the CLI use."""

    #: Whether :meth:`path` verifies every copy it hands out (the remote backends' caches);
    #: then :meth:`verified` (and so :meth:`load`) does not compute the checksums again.
    path_verifies: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the store lives, for people: a directory or an ``s3://`` URL."""

    @abc.abstractmethod
    def deployments(self) -> list[str]:
        """Deployments in the store, sorted."""

    @abc.abstractmethod
    def versions(self, deployment: str) -> list[str]:
        """Published versions, oldest first."""

    @abc.abstractmethod
    def path(self, deployment: str, version: str) -> Path:
        """A local directory holding the published version's bundle (verified by the remote
        backends before it is returned)."""

    @abc.abstractmethod
    def manifest(self, deployment: str, version: str) -> Manifest:
        """The manifest of a published version (not checksummed; see :meth:`load`)."""

    @abc.abstractmethod
    def publish(
        self, deployment: str, build: Build, parent: str | None = None, *, activate: bool = False
    ) -> str:
        """Publish a new version built by ``build(tmp_dir, version)``; returns the version id,
        which the store allocates (the next free one if another publisher took it first)."""

    @abc.abstractmethod
    def delete(self, deployment: str, version: str) -> None:
        """Remove a published version, never the active one; its id is never reused."""

    @abc.abstractmethod
    def active(self, deployment: str) -> str | None:
        """The active version id, or ``None`` when none was activated yet."""

    @abc.abstractmethod
    def active_token(self, deployment: str) -> Hashable | None:
        """A cheap fingerprint of the active pointer that changes with every activation (even
        of the same version); ``None`` while none was activated. Poll it, and call
        :meth:`active` only when it changes."""

    @abc.abstractmethod
    def activate(self, deployment: str, version: str) -> None:
        """Point the active pointer at ``version`` after verifying its bundle;
        :class:`RejectedCandidateError` for a rejected candidate (see
        :meth:`activate_override`)."""

    @abc.abstractmethod
    def repair_lock(
        self, deployment: str, *, blocking: bool = False
    ) -> AbstractContextManager[object]:
        """Hold the deployment's repair lock for a ``with`` block: ``RepairLockedError`` at
        once when another process holds it, or with ``blocking=True`` wait for it."""

    @abc.abstractmethod
    def cleanup(
        self, deployment: str | None = None, *, older_than_s: float = DEFAULT_STALE_TMP_SECONDS
    ) -> Sequence[str | Path]:
        """Remove what crashed publishes and deleted versions left behind (older than
        ``older_than_s``, so a publish still running keeps its files); returns what was
        removed. Every deployment unless one is named."""

    # --- shared by every backend ---

    def load(self, deployment: str, version: str | None = None) -> Bundle:
        """Open (and checksum) a version's bundle; the active one by default."""
        if version is None:
            version = self.active(deployment)
            if version is None:
                raise UnknownVersionError(f"deployment {deployment!r} has no active version")
        path, manifest = self.verified(deployment, version)
        return Bundle(path, manifest)

    def verified(self, deployment: str, version: str) -> tuple[Path, Manifest]:
        """The local directory of a published version and its manifest, every file checked
        against its sha256 once (by :meth:`path` where :attr:`path_verifies`, else here)."""
        path = self.path(deployment, version)
        return path, (read_manifest(path) if self.path_verifies else verify_bundle(path))

    def read_file(self, deployment: str, version: str, rel: str) -> bytes:
        """One file the version's manifest lists, checked against its sha256 (remote backends
        fetch just that file). ``FileNotFoundError`` if the manifest lists no ``rel``;
        ``BundleIntegrityError`` if the file is missing or fails its check."""
        manifest = self.manifest(deployment, version)
        if rel not in manifest.files:
            raise FileNotFoundError(f"version {version} of {deployment!r} has no file {rel!r}")
        return Bundle(self.path(deployment, version), manifest).read_verified(rel)

    def rollback(self, deployment: str, version: str | None = None) -> str:
        """Activate ``version``, or else the active version's nearest ancestor that is not a
        rejected candidate (else the newest such version before it).

        Returns the version now active. A ``version`` that is a rejected candidate is refused
        like :meth:`activate` refuses it.
        """
        if version is None:
            version = self._rollback_target(deployment)
        self.activate(deployment, version)
        return version

    def _rollback_target(self, deployment: str) -> str:
        current = self.active(deployment)
        if current is None:
            raise UnknownVersionError(f"deployment {deployment!r} has no active version")
        published = self.versions(deployment)
        seen = {current}
        parent = self.manifest(deployment, current).parent
        while parent is not None and parent in published and parent not in seen:
            seen.add(parent)
            manifest = self.manifest(deployment, parent)
            if rejected_candidate(manifest) is None:
                return parent
            parent = manifest.parent  # an override copy's parent is its candidate: skip it
        for earlier in reversed(published):
            if version_number(earlier) >= version_number(current) or earlier in seen:
                continue
            if rejected_candidate(self.manifest(deployment, earlier)) is None:
                return earlier
        raise UnknownVersionError(
            f"deployment {deployment!r}: nothing to roll back to from {current!r}"
        )

    def activate_override(self, deployment: str, candidate: str, *, reason: str, by: str) -> str:
        """Serve a rejected candidate's nets anyway: publish a copy of ``candidate`` (parent
        ``candidate``) whose provenance records ``{"override": {"of", "reason", "at", "by",
        "gate"}}`` (``gate``: the candidate's verdict) and activate the copy; returns its id.

        The reason (1 to 500 characters) and ``by`` (``admin`` or ``cli``) are checked first;
        ``ValueError`` for either, or when ``candidate`` is not a rejected candidate (activate
        it without an override). The candidate itself stays as it was: bundles are immutable.
        """
        text = check_override_reason(reason)
        if by not in OVERRIDE_SOURCES:
            raise ValueError(f"override by {by!r}: expected one of {', '.join(OVERRIDE_SOURCES)}")
        gate = rejected_candidate(self.manifest(deployment, candidate))
        if gate is None:
            raise ValueError(
                f"{candidate} is not a rejected candidate: activate it without an override"
            )
        source, manifest = self.verified(deployment, candidate)
        record = {"of": candidate, "reason": text, "at": utc_now_iso(), "by": by, "gate": gate}

        def build(tmp: Path, version: str) -> Manifest:
            _copy_listed(source, manifest, tmp)
            provenance = {k: v for k, v in manifest.provenance.items() if k != CANDIDATE_KEY}
            provenance[OVERRIDE_KEY] = record
            copy = manifest.model_copy(
                update={
                    "version": version,
                    "parent": candidate,
                    "created": record["at"],
                    "provenance": provenance,
                }
            )
            write_manifest(tmp, copy)
            return copy

        version = self.publish(deployment, build, candidate)
        self.activate(deployment, version)
        return version

    def import_bundle(self, deployment: str, source_dir: Path, *, activate: bool = False) -> str:
        """Copy the bundle in ``source_dir`` into the store as a new version; returns its id.

        The source's checksums are verified first (``BundleIntegrityError`` for a tampered or
        incomplete bundle), and the copy is verified again against the same manifest before it
        is published, so a file changed while copying is refused too. The new version's
        manifest carries the id the store allocated and no parent (the source's version and
        parent are kept in ``provenance["imported"]``). Only the files the manifest lists are
        copied.
        """
        source = Path(source_dir)
        manifest = verify_bundle(source)

        def build(tmp: Path, version: str) -> Manifest:
            _copy_listed(source, manifest, tmp)
            provenance = dict(manifest.provenance)
            provenance["imported"] = {
                "source_version": manifest.version,
                "source_parent": manifest.parent,
                "at": utc_now_iso(),
            }
            imported = manifest.model_copy(
                update={"version": version, "parent": None, "provenance": provenance}
            )
            write_manifest(tmp, imported)
            return imported

        return self.publish(deployment, build, None, activate=activate)

    @staticmethod
    def _check_built(manifest: Manifest, version: str, parent: str | None) -> None:
        """``build`` must write the version and parent the store asked for."""
        if manifest.version != version or manifest.parent != parent:
            raise ValueError(
                f"build wrote version {manifest.version!r} (parent {manifest.parent!r}); "
                f"the store asked for {version!r} (parent {parent!r})"
            )


def _copy_listed(source: Path, manifest: Manifest, target_dir: Path) -> None:
    """Copy the files ``manifest`` lists from the bundle ``source`` into ``target_dir``."""
    root = source.resolve()
    for rel in sorted(manifest.files):
        origin = (source / rel).resolve()
        if not origin.is_relative_to(root):  # verify_bundle refused this already
            raise StoreError(f"{source}: listed file {rel!r} lies outside the bundle")
        target = target_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target)
