"""The local model store (the default backend of :class:`models.store_base.BundleStore`):
versioned bundles per deployment, an active pointer, atomic publish.

Layout under ``root`` (a local directory, or a shared volume in a cluster)::

    <deployment>/versions/v0001/   one bundle per version, never changed once published
    <deployment>/versions/v0002/
    <deployment>/ACTIVE            the active version id
    <deployment>/.repair.lock      flock'ed while a repair of the deployment runs
    <deployment>/.tmp-<uuid>/      a publish in progress (or crashed: see cleanup())

Publishing writes the bundle into a temp dir, fsyncs it and renames it into place, so readers
never see half a bundle; the ACTIVE pointer is swapped with ``os.replace`` (a new inode every
time, which is what :meth:`ModelStore.active_token` lets pollers notice with one ``stat``).
The store's names and errors live in :mod:`models.store_names` and are re-exported here;
:mod:`models.s3_store` is the object-storage backend.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from models.bundle import Manifest, read_manifest, verify_bundle, write_manifest
from models.durable import fsync_path, fsync_tree
from models.store_base import (
    DEFAULT_STALE_TMP_SECONDS,
    MAX_PUBLISH_ATTEMPTS,
    Build,
    BundleStore,
    RejectedCandidateError,
    check_activatable,
)
from models.store_names import (
    DEPLOYMENT_PATTERN,
    VERSION_DIGITS,
    VERSION_PATTERN,
    VERSION_PREFIX,
    ActiveVersionError,
    InvalidNameError,
    RepairLockedError,
    StoreError,
    StoreUnavailableError,
    UnknownDeploymentError,
    UnknownVersionError,
    check_deployment,
    format_version,
    next_version,
    version_number,
)

__all__ = [
    "DEFAULT_STALE_TMP_SECONDS",
    "DEPLOYMENT_PATTERN",
    "MAX_PUBLISH_ATTEMPTS",
    "VERSION_DIGITS",
    "VERSION_PATTERN",
    "VERSION_PREFIX",
    "ActiveToken",
    "ActiveVersionError",
    "BundleStore",
    "InvalidNameError",
    "ModelStore",
    "RejectedCandidateError",
    "RepairLockedError",
    "StoreError",
    "StoreUnavailableError",
    "UnknownDeploymentError",
    "UnknownVersionError",
    "format_version",
    "version_number",
]

VERSIONS_DIR = "versions"
DELETED_DIR = "deleted"  # tombstones: a deleted version's id is never given out again
ACTIVE_FILE = "ACTIVE"
REPAIR_LOCK_FILE = ".repair.lock"
TMP_PREFIX = ".tmp-"

ActiveToken = tuple[int, int, int]
"""``(st_mtime_ns, st_ino, st_size)`` of a deployment's ACTIVE file: changes whenever the
active pointer is swapped."""


class ModelStore(BundleStore):
    """Versioned bundles under one local root; see the module docstring for the layout."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    # --- names and paths ---

    def _deployment_dir(self, deployment: str, *, must_exist: bool = True) -> Path:
        directory = self.root / check_deployment(deployment)
        if must_exist and not directory.is_dir():
            raise UnknownDeploymentError(f"unknown deployment {deployment!r} in {self.root}")
        return directory

    def deployments(self) -> list[str]:
        """Deployments with a directory in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and DEPLOYMENT_PATTERN.match(p.name)
        )

    def versions(self, deployment: str) -> list[str]:
        """Published versions, oldest first (temp dirs of running or crashed publishes excluded)."""
        versions_dir = self._deployment_dir(deployment) / VERSIONS_DIR
        if not versions_dir.is_dir():
            return []
        found = [
            p.name for p in versions_dir.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)
        ]
        return sorted(found, key=version_number)

    def path(self, deployment: str, version: str) -> Path:
        """The bundle directory of a published version."""
        version_number(version)
        path = self._deployment_dir(deployment) / VERSIONS_DIR / version
        if not path.is_dir():
            raise UnknownVersionError(f"deployment {deployment!r} has no version {version!r}")
        return path

    def manifest(self, deployment: str, version: str) -> Manifest:
        """The manifest of a published version (not checksummed; see :meth:`load`)."""
        return read_manifest(self.path(deployment, version))

    # --- publishing ---

    def publish(
        self,
        deployment: str,
        build: Build,
        parent: str | None = None,
        *,
        activate: bool = False,
    ) -> str:
        """Publish a new version built by ``build(tmp_dir, version)``; returns the version id.

        ``build`` writes a bundle (usually via :func:`models.bundle.write_bundle`) whose manifest
        carries ``version`` and ``parent``. The bundle is verified, fsynced and renamed into
        ``versions/``; if another publisher took the id first, the manifest is rewritten with the
        next free id. If ``build`` raises, nothing is published and the error propagates.
        """
        deployment_dir = self._deployment_dir(deployment, must_exist=False)
        if parent is not None:
            self.path(deployment, parent)
        versions_dir = deployment_dir / VERSIONS_DIR
        versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = deployment_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            version = self._next_version(deployment)
            manifest = build(tmp, version)
            self._check_built(manifest, version, parent)
            verify_bundle(tmp)
            fsync_tree(tmp)
            for _attempt in range(MAX_PUBLISH_ATTEMPTS):
                try:
                    os.rename(tmp, versions_dir / version)
                    break
                except OSError as err:
                    if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                version = next_version(self._numbers(deployment), version)
                manifest = manifest.model_copy(update={"version": version})
                write_manifest(tmp, manifest)
                fsync_path(tmp)
            else:
                raise StoreError(f"could not allocate a version id for {deployment!r}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(versions_dir)
        if activate:
            self.activate(deployment, version)
        return version

    def _numbers(self, deployment: str) -> list[int]:
        tombstones = self._deployment_dir(deployment) / DELETED_DIR
        deleted = [p.name for p in tombstones.iterdir()] if tombstones.is_dir() else []
        return [version_number(v) for v in [*self.versions(deployment), *deleted]]

    def delete(self, deployment: str, version: str) -> None:
        """Remove a published version, never the active one. The bundle is renamed away first
        (readers see it whole or not at all) and a tombstone keeps its id from being reused."""
        path = self.path(deployment, version)
        if self.active(deployment) == version:
            raise ActiveVersionError(f"{version} is the active version of {deployment!r}")
        deployment_dir = self._deployment_dir(deployment)
        tombstones = deployment_dir / DELETED_DIR
        tombstones.mkdir(exist_ok=True)
        (tombstones / version).touch()
        fsync_path(tombstones)
        trash = deployment_dir / f"{TMP_PREFIX}deleted-{version}-{uuid.uuid4().hex}"
        os.rename(path, trash)
        fsync_path(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _next_version(self, deployment: str) -> str:
        return next_version(self._numbers(deployment))

    # --- the active pointer ---

    def active(self, deployment: str) -> str | None:
        """The active version id, or ``None`` when none was activated yet."""
        pointer = self._deployment_dir(deployment) / ACTIVE_FILE
        try:
            text = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def active_token(self, deployment: str) -> ActiveToken | None:
        """A cheap fingerprint of the active pointer: ``(st_mtime_ns, st_ino, st_size)`` of the
        ACTIVE file, ``None`` while none was activated. One ``stat``, no read or parse: poll it
        and call :meth:`active` only when it changes. Every activation replaces the file with a
        new one (``os.replace``), so even re-activating the same version changes the token.
        """
        pointer = self._deployment_dir(deployment) / ACTIVE_FILE
        try:
            st = pointer.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def activate(self, deployment: str, version: str) -> None:
        """Point ACTIVE at ``version`` after verifying its bundle; atomic via ``os.replace``.
        A rejected candidate is refused (:class:`RejectedCandidateError`)."""
        check_activatable(self.verified(deployment, version)[1])
        deployment_dir = self._deployment_dir(deployment)
        tmp = deployment_dir / f"{TMP_PREFIX}{ACTIVE_FILE}-{uuid.uuid4().hex}"
        try:
            with tmp.open("w") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, deployment_dir / ACTIVE_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(deployment_dir)

    # --- repairs ---

    @contextlib.contextmanager
    def repair_lock(self, deployment: str, *, blocking: bool = False) -> Iterator[Path]:
        """Hold the deployment's repair lock for the ``with`` block; yields the lock file.

        An exclusive ``fcntl.flock`` on ``<deployment>/.repair.lock``: one repair of a
        deployment at a time across processes (the lock file records the holder's pid). When
        another process holds it, :class:`RepairLockedError` is raised at once, or with
        ``blocking=True`` the call waits. The kernel releases the lock when its holder exits,
        even by SIGKILL, so a killed repair never leaves the deployment locked. On NFS, Linux
        emulates ``flock`` with POSIX byte-range locks, which the server coordinates.
        """
        path = self._deployment_dir(deployment) / REPAIR_LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RepairLockedError(
                    f"a repair of deployment {deployment!r} is already running "
                    f"(pid {holder} holds {path})"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield path
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- housekeeping ---

    def cleanup(
        self, deployment: str | None = None, *, older_than_s: float = DEFAULT_STALE_TMP_SECONDS
    ) -> list[Path]:
        """Remove temp dirs/files left by crashed publishes or activations; returns them.

        Only entries older than ``older_than_s`` are removed, so a publish still running in
        another process keeps its temp dir.
        """
        names = [deployment] if deployment is not None else self.deployments()
        cutoff = time.time() - older_than_s
        removed: list[Path] = []
        for name in names:
            for entry in self._deployment_dir(name).iterdir():
                if not entry.name.startswith(TMP_PREFIX) or entry.lstat().st_mtime > cutoff:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed
