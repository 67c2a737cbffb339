"""What every model store backend shares: names, errors and the :class:`BundleStore` interface.

A store holds versioned bundles per deployment, an active pointer, and a repair lock. The
backends (:class:`models.store.ModelStore`, a local directory; :class:`models.s3_store.S3Store`,
S3-compatible object storage) keep the same guarantees: a version is published whole or not
at all, every bundle is checked against its manifest's sha256 before it is used, the active
pointer moves atomically, and a version id is never given out twice (not even after a delete).
:func:`models.store_open.open_store` picks the backend from a location string; the names
and errors are in :mod:`models.store_names`.
"""

from __future__ import annotations

import abc
import shutil
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from pathlib import Path

from models.bundle import (
    Bundle,
    Manifest,
    load_bundle,
    utc_now_iso,
    verify_bundle,
    write_manifest,
)
from models.store_names import StoreError, UnknownVersionError, version_number

# Publishers that lose the race for a version id retry with the next one this many times.
MAX_PUBLISH_ATTEMPTS = 100
# cleanup() leaves younger leftovers alone: they may belong to a publish still running.
DEFAULT_STALE_TMP_SECONDS = 3600.0


Build = Callable[[Path, str], Manifest]
"""``build(tmp_dir, version)`` writes a bundle for ``version`` into ``tmp_dir`` and returns its
manifest (usually :func:`models.bundle.write_bundle`)."""


class BundleStore(abc.ABC):
    """The model store interface the API, the worker and the CLI use."""

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
        """Point the active pointer at ``version`` after verifying its bundle."""

    @abc.abstractmethod
    def repair_lock(
        self, deployment: str, *, blocking: bool = False
    ) -> AbstractContextManager[object]:
        """Hold the deployment's repair lock for a ``with`` block: ``RepairLockedError`` at
        once when another process holds it, or with ``blocking=True`` wait for it."""

    # --- shared by every backend ---

    def load(self, deployment: str, version: str | None = None) -> Bundle:
        """Open (and checksum) a version's bundle; the active one by default."""
        if version is None:
            version = self.active(deployment)
            if version is None:
                raise UnknownVersionError(f"deployment {deployment!r} has no active version")
        return load_bundle(self.path(deployment, version))

    def rollback(self, deployment: str, version: str | None = None) -> str:
        """Activate ``version``, or else the active version's parent (else the one before it).

        Returns the version now active.
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
        parent = self.manifest(deployment, current).parent
        if parent is not None and parent in published:
            return parent
        earlier = [v for v in published if version_number(v) < version_number(current)]
        if not earlier:
            raise UnknownVersionError(
                f"deployment {deployment!r}: nothing to roll back to from {current!r}"
            )
        return earlier[-1]

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
        root = source.resolve()

        def build(tmp: Path, version: str) -> Manifest:
            for rel in sorted(manifest.files):
                origin = (source / rel).resolve()
                if not origin.is_relative_to(root):  # verify_bundle refused this already
                    raise StoreError(f"{source}: listed file {rel!r} lies outside the bundle")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(origin, target)
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
