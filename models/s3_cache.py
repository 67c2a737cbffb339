"""The local cache of an object-storage store: bundles downloaded into directories, so
``path()`` and ``load()`` hand callers a verified local bundle exactly like the local store.

Layout under ``root`` (one per bucket and prefix)::

    <deployment>/<version>/    a complete bundle, verified against its manifest's sha256
    <deployment>/.tmp-<uuid>/  a download or publish in progress (or crashed: see cleanup())

A version is downloaded into a temp dir, every file checked against the manifest's sha256
as it arrives, the whole bundle verified again, and only then renamed into place; so a reader
never sees a partial or unverified copy, and several processes may share one cache. A copy in
place that passes verification is never replaced: of two processes that downloaded the same
version at once, the second drops its own copy and uses the first's (which the first may be
loading from). Only a copy that fails verification is renamed aside and replaced.

The cache is bounded (:meth:`BundleCache.prune`, called after every install): per deployment
it keeps the versions it is told to protect (the active one, the one just installed) and the
most recently used others (a copy's directory mtime is its last hand-out:
:meth:`BundleCache.touch`), at most ``keep`` in all unless more are protected.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from models.bundle import MANIFEST_NAME, BundleIntegrityError, read_manifest, verify_bundle
from models.store_names import VERSION_PATTERN, version_number

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
DEFAULT_KEEP_VERSIONS = 3  # cached versions kept per deployment (see BundleCache.prune)
INSTALL_ATTEMPTS = 3

Fetch = Callable[[str, Path], "str | None"]
"""``fetch(sha256, path)`` downloads the blob with that digest into ``path`` and returns the
sha256 of what it wrote, or ``None`` when there is no such blob."""


class BundleCache:
    """Verified local copies of published versions; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def directory(self, deployment: str, version: str) -> Path:
        return self.root / deployment / version

    def tmp_dir(self, deployment: str) -> Path:
        """A fresh, empty temp dir on the cache's file system (so it can be renamed in)."""
        tmp = self.root / deployment / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        return tmp

    def cached(self, deployment: str, version: str, manifest: bytes) -> Path | None:
        """The cached copy if it holds exactly ``manifest`` and still passes its checksums."""
        target = self.directory(deployment, version)
        try:
            if (target / MANIFEST_NAME).read_bytes() != manifest:
                return None
            verify_bundle(target)
        except FileNotFoundError:
            return None
        except BundleIntegrityError as err:
            logger.warning("cached copy refused, downloading again: %s", err)
            return None
        return target

    def fill(
        self, deployment: str, version: str, manifest: bytes, fetch: Fetch, where: str
    ) -> Path:
        """Download ``version`` (its ``manifest`` bytes given) with ``fetch`` and install it;
        ``BundleIntegrityError`` names ``where`` if a blob is missing or fails its sha256."""
        tmp = self.tmp_dir(deployment)
        try:
            (tmp / MANIFEST_NAME).write_bytes(manifest)
            parsed = read_manifest(tmp)
            if parsed.version != version:
                raise BundleIntegrityError(
                    f"{where}: the manifest of {version} names version {parsed.version}"
                )
            for rel, expected in sorted(parsed.files.items()):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                got = fetch(expected, target)
                if got is None:
                    raise BundleIntegrityError(f"{where}: listed file {rel!r} is missing")
                if got != expected:
                    raise BundleIntegrityError(f"{where}: file {rel!r} fails its sha256 check")
            verify_bundle(tmp)
            return self.install(deployment, version, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def install(self, deployment: str, version: str, tmp: Path) -> Path:
        """Rename the verified bundle in ``tmp`` into place and return it. A copy already in
        place that holds the same manifest and passes verification is kept (another process
        may be loading from it) and ``tmp`` is removed; only one that fails is renamed aside
        and replaced."""
        target = self.directory(deployment, version)
        manifest = (tmp / MANIFEST_NAME).read_bytes()
        for _attempt in range(INSTALL_ATTEMPTS):
            try:
                os.rename(tmp, target)
                return target
            except OSError as err:  # a copy is in place (another installer's, or a stale one)
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if self.cached(deployment, version, manifest) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            self.evict(deployment, version)
        raise OSError(errno.EEXIST, f"could not install {version} into {target}")

    def touch(self, deployment: str, version: str) -> None:
        """Record that the copy of ``version`` was just handed out (its directory's mtime)."""
        with contextlib.suppress(OSError):
            os.utime(self.directory(deployment, version))

    def prune(self, deployment: str, protect: Collection[str], keep: int) -> list[Path]:
        """Bound the cache of ``deployment``: keep the versions in ``protect`` and the most
        recently used others, ``keep`` in all (more only if more are protected); rename the
        rest aside and remove them. Returns the directories removed."""
        base = self.root / deployment
        try:
            copies = [p for p in base.iterdir() if VERSION_PATTERN.match(p.name) and p.is_dir()]
        except FileNotFoundError:
            return []

        def last_used(path: Path) -> tuple[int, int]:
            try:
                return (path.stat().st_mtime_ns, version_number(path.name))
            except FileNotFoundError:
                return (0, version_number(path.name))

        protected = [p for p in copies if p.name in protect]
        others = sorted((p for p in copies if p.name not in protect), key=last_used, reverse=True)
        removed = []
        for path in others[max(0, keep - len(protected)) :]:
            self.evict(deployment, path.name)
            removed.append(path)
        return removed

    def evict(self, deployment: str, version: str) -> None:
        """Drop the cached copy of a version (renamed away first, then removed)."""
        target = self.directory(deployment, version)
        trash = target.with_name(f"{TMP_PREFIX}evicted-{version}-{uuid.uuid4().hex}")
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self, keep: Callable[[str, str], bool], older_than_s: float) -> list[Path]:
        """Remove temp dirs older than ``older_than_s`` and copies of versions for which
        ``keep(deployment, version)`` is False; returns what was removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        cutoff = time.time() - older_than_s
        for deployment_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sorted(deployment_dir.iterdir()):
                if entry.name.startswith(TMP_PREFIX):
                    if entry.lstat().st_mtime > cutoff:
                        continue
                elif keep(deployment_dir.name, entry.name):
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed
