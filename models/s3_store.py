"""The model store on S3-compatible object storage (``NNOC_STORE_ROOT=s3://bucket/prefix``),
with the local store's guarantees.

Layout under ``s3://bucket/prefix``::

    <deployment>/blobs/<sha256>                   every bundle file, named by its content
    <deployment>/versions/v0001/manifest.json     a version: written last, never changed
    <deployment>/deleted/v0001                    tombstone: a deleted id is never reused
    <deployment>/ACTIVE                           {"version": ..., "nonce": ...}
    <deployment>/REPAIR_LOCK                      lease lock of a running repair

Publishing uploads the bundle's files as blobs, then creates the version's manifest with a
conditional put (``If-None-Match: *``): of two publishers racing for an id exactly one wins,
the other takes the next id. A version therefore exists exactly when its manifest does, and
all its blobs are there before it appears. Readers download a version into a local cache,
checked against the manifest's sha256 (:mod:`models.s3_cache`), so ``path()`` and ``load()``
return a verified local directory as the local store does. Activation rewrites ``ACTIVE``
with a fresh nonce, so its ETag (one HEAD: :meth:`S3Store.active_token`) changes with every
activation, which is what the API processes poll. Blobs are shared by versions with equal
files; :meth:`S3Store.cleanup` removes the ones no manifest lists any more. The local cache
keeps a few versions per deployment (:meth:`models.s3_cache.BundleCache.prune`). While this
store holds a deployment's repair lock, :meth:`S3Store.publish` and :meth:`S3Store.activate`
first check the lock is still ours (:class:`models.store_names.LockLostError` if it was lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import ValidationError

from models.bundle import (
    MANIFEST_NAME,
    BundleIntegrityError,
    Manifest,
    utc_now_iso,
    verify_bundle,
    write_manifest,
)
from models.s3_cache import DEFAULT_KEEP_VERSIONS, BundleCache
from models.s3_lock import DEFAULT_LEASE_S, LeaseLock, lock_client
from models.s3_objects import ConditionFailedError, Objects, S3Location
from models.store_base import (
    DEFAULT_STALE_TMP_SECONDS,
    MAX_PUBLISH_ATTEMPTS,
    Build,
    BundleStore,
    check_activatable,
)
from models.store_names import (
    VERSION_PATTERN,
    ActiveVersionError,
    StoreError,
    UnknownDeploymentError,
    UnknownVersionError,
    check_deployment,
    next_version,
    version_number,
)

BLOBS = "blobs"
VERSIONS = "versions"
DELETED = "deleted"
ACTIVE = "ACTIVE"
REPAIR_LOCK = "REPAIR_LOCK"

logger = logging.getLogger(__name__)


def parse_manifest(data: bytes, where: str) -> Manifest:
    """A manifest from its bytes; ``BundleIntegrityError`` naming ``where`` if invalid."""
    try:
        return Manifest.from_dict(json.loads(data))
    except ValueError as err:  # JSON errors and pydantic's ValidationError
        kind = "not a valid manifest" if isinstance(err, ValidationError) else "unreadable"
        raise BundleIntegrityError(f"{where} is {kind}: {err}") from None


class S3Store(BundleStore):
    """Versioned bundles in a bucket under a prefix; see the module docstring.

    ``cache_dir`` holds the verified local copies (a directory per bucket and prefix);
    ``client`` is a boto3 S3 client (default: from boto3's standard configuration);
    ``lock_lease_s`` is the repair lock's lease (:mod:`models.s3_lock`);
    ``cache_versions`` how many versions per deployment the cache keeps.
    """

    path_verifies = True  # path() hands out verified copies only

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        *,
        client: object = None,
        lock_lease_s: float = DEFAULT_LEASE_S,
        cache_versions: int = DEFAULT_KEEP_VERSIONS,
    ) -> None:
        self.where = S3Location.parse(url)
        self.objects = Objects(self.where.bucket, client)
        self._client_given = client is not None
        name = "~".join([self.where.bucket, *self.where.prefix.split("/")]).rstrip("~")
        self.cache = BundleCache(Path(cache_dir) / name)
        self.lock_lease_s = lock_lease_s
        self.cache_versions = cache_versions
        self._held: dict[str, LeaseLock] = {}  # deployment -> the repair lock this store holds

    @property
    def location(self) -> str:
        return self.where.url

    # --- names and keys ---

    def _key(self, deployment: str, *parts: str) -> str:
        return self.where.key(check_deployment(deployment), *parts)

    def _manifest_key(self, deployment: str, version: str) -> str:
        version_number(version)
        return self._key(deployment, VERSIONS, version, MANIFEST_NAME)

    def _url(self, key: str) -> str:
        return f"s3://{self.where.bucket}/{key}"

    def _require_deployment(self, deployment: str) -> None:
        if not self.objects.any_under(self._key(deployment) + "/"):
            raise UnknownDeploymentError(f"unknown deployment {deployment!r} in {self.location}")

    # --- listing and reading ---

    def deployments(self) -> list[str]:
        """Deployments with at least one object in the store, sorted."""
        top = f"{self.where.prefix}/" if self.where.prefix else ""
        names = self.objects.children(top)
        return sorted(n for n in names if _valid_deployment(n))

    def _listed(self, deployment: str, folder: str) -> list[str]:
        prefix = self._key(deployment, folder) + "/"
        found = []
        for key, _modified in self.objects.listing(prefix):
            name, _, rest = key[len(prefix) :].partition("/")
            wanted = rest == MANIFEST_NAME if folder == VERSIONS else rest == ""
            if wanted and VERSION_PATTERN.match(name):
                found.append(name)
        return sorted(found, key=version_number)

    def versions(self, deployment: str) -> list[str]:
        """Published versions (those with a manifest), oldest first."""
        found = self._listed(deployment, VERSIONS)
        if not found:
            self._require_deployment(deployment)
        return found

    def _manifest_bytes(self, deployment: str, version: str) -> bytes:
        fetched = self.objects.get(self._manifest_key(deployment, version))
        if fetched is None:
            self._require_deployment(deployment)
            raise UnknownVersionError(f"deployment {deployment!r} has no version {version!r}")
        return fetched.body

    def manifest(self, deployment: str, version: str) -> Manifest:
        """The manifest of a published version (one GET; blobs not checked: see :meth:`load`)."""
        data = self._manifest_bytes(deployment, version)
        return parse_manifest(data, self._url(self._manifest_key(deployment, version)))

    def path(self, deployment: str, version: str) -> Path:
        """The verified local copy of a published version, downloaded if the cache has none
        (or a stale or damaged one). ``BundleIntegrityError`` if a blob is missing or fails
        its sha256; nothing unverified is left in the cache."""
        data = self._manifest_bytes(deployment, version)
        cached = self.cache.cached(deployment, version, data)
        if cached is not None:
            self.cache.touch(deployment, version)
            return cached

        def fetch(sha256: str, target: Path) -> str | None:
            return self.objects.download(self._key(deployment, BLOBS, sha256), target)

        where = self._url(self._key(deployment, VERSIONS, version))
        installed = self.cache.fill(deployment, version, data, fetch, where)
        self.cache.touch(deployment, version)
        self._prune(deployment, version)
        return installed

    def read_file(self, deployment: str, version: str, rel: str) -> bytes:
        """One listed file of a published version: one GET of its blob, checked against the
        manifest's sha256 (the bundle is not downloaded). ``FileNotFoundError`` if the
        manifest lists no ``rel``; ``BundleIntegrityError`` if its blob is missing or damaged."""
        expected = self.manifest(deployment, version).files.get(rel)
        if expected is None:
            raise FileNotFoundError(f"version {version} of {deployment!r} has no file {rel!r}")
        fetched = self.objects.get(self._key(deployment, BLOBS, expected))
        where = self._url(self._key(deployment, VERSIONS, version))
        if fetched is None:
            raise BundleIntegrityError(f"{where}: listed file {rel!r} is missing")
        if hashlib.sha256(fetched.body).hexdigest() != expected:
            raise BundleIntegrityError(f"{where}: file {rel!r} fails its sha256 check")
        return fetched.body

    def _prune(self, deployment: str, installed: str) -> None:
        """Bound the cache after an install: keep the active version, ``installed`` and the
        most recently used others (``cache_versions`` in all); never fails the caller."""
        try:
            active = self.active(deployment)
            protect = {installed} if active is None else {installed, active}
            for path in self.cache.prune(deployment, protect, self.cache_versions):
                logger.info("removed the cached copy %s (keeping %d)", path, self.cache_versions)
        except (StoreError, OSError) as err:
            logger.warning("could not prune the cache of %s: %s", deployment, err)

    def _check_lock(self, deployment: str) -> None:
        """``LockLostError`` if this store holds the deployment's repair lock and lost it."""
        lock = self._held.get(deployment)
        if lock is not None:
            lock.check()

    # --- publishing ---

    def publish(
        self, deployment: str, build: Build, parent: str | None = None, *, activate: bool = False
    ) -> str:
        """Publish a new version built by ``build(tmp_dir, version)``; returns the version id.

        The bundle is built in a local temp dir and verified, its files are uploaded as blobs,
        and its manifest is created last with ``If-None-Match: *``; a publisher that loses the
        id to another rewrites the manifest with the next free id. If ``build`` raises,
        nothing is published (blobs already uploaded are left to :meth:`cleanup`).
        """
        check_deployment(deployment)
        if parent is not None:
            self._manifest_bytes(deployment, parent)
        tmp = self.cache.tmp_dir(deployment)
        try:
            version = self._next_version(deployment)
            manifest = build(tmp, version)
            self._check_built(manifest, version, parent)
            verify_bundle(tmp)
            for rel, sha256 in sorted(manifest.files.items()):
                self.objects.upload(self._key(deployment, BLOBS, sha256), tmp / rel, sha256)
            self._check_lock(deployment)  # a repair that lost its lock publishes nothing
            version = self._claim(deployment, tmp, manifest, version)
            with contextlib.suppress(OSError):  # published: keeping a local copy is a bonus
                self.cache.install(deployment, version, tmp)
                self._prune(deployment, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if activate:
            self.activate(deployment, version)
        return version

    def _claim(self, deployment: str, tmp: Path, manifest: Manifest, version: str) -> str:
        """Create the manifest of the first free id from ``version`` on; returns that id.

        An id is taken when its manifest exists (the conditional put fails) or its tombstone
        does (published and deleted while this bundle was built). A put that failed only
        because boto3 retried one that had succeeded finds its own manifest and keeps it."""
        for _attempt in range(MAX_PUBLISH_ATTEMPTS):
            if not self.objects.exists(self._key(deployment, DELETED, version)):
                if manifest.version != version:
                    manifest = manifest.model_copy(update={"version": version})
                    write_manifest(tmp, manifest)
                body = (tmp / MANIFEST_NAME).read_bytes()
                key = self._manifest_key(deployment, version)
                try:
                    self.objects.put(key, body, if_none_match=True)
                    return version
                except ConditionFailedError:
                    # Ours after all if a retried request had already stored it.
                    current = self.objects.get(key)
                    if current is not None and current.body == body:
                        return version
            version = next_version(self._numbers(deployment), version)
        raise StoreError(f"could not allocate a version id for {deployment!r}")

    def _numbers(self, deployment: str) -> list[int]:
        # Versions first, then tombstones: delete() writes the tombstone before it removes the
        # manifest, so an id is always in one list or the other.
        published = self._listed(deployment, VERSIONS)
        deleted = self._listed(deployment, DELETED)
        return [version_number(v) for v in [*published, *deleted]]

    def _next_version(self, deployment: str) -> str:
        return next_version(self._numbers(deployment))

    def delete(self, deployment: str, version: str) -> None:
        """Remove a published version, never the active one: a tombstone first (its id is
        never reused), then the manifest (the version is gone at once for every reader).
        Its blobs stay until :meth:`cleanup` finds no manifest listing them."""
        self._manifest_bytes(deployment, version)
        if self.active(deployment) == version:
            raise ActiveVersionError(f"{version} is the active version of {deployment!r}")
        self.objects.put(self._key(deployment, DELETED, version), b"")
        self.objects.delete(self._manifest_key(deployment, version))
        self.cache.evict(deployment, version)

    # --- the active pointer ---

    def active(self, deployment: str) -> str | None:
        """The active version id, or ``None`` when none was activated yet."""
        key = self._key(deployment, ACTIVE)
        fetched = self.objects.get(key)
        if fetched is None:
            self._require_deployment(deployment)
            return None
        try:
            version = json.loads(fetched.body)["version"]
            version_number(version)
        except (ValueError, KeyError, TypeError, StoreError) as err:
            raise StoreError(f"{self._url(key)} is unreadable: {err}") from None
        return str(version)

    def active_token(self, deployment: str) -> str | None:
        """The ETag of the ACTIVE object (one HEAD), ``None`` while none was activated. Every
        activation writes a new nonce, so even re-activating the same version changes it."""
        etag = self.objects.etag(self._key(deployment, ACTIVE))
        if etag is None:
            self._require_deployment(deployment)
        return etag

    def activate(self, deployment: str, version: str) -> None:
        """Point ACTIVE at ``version`` after downloading and verifying its bundle (``path()``
        hands out verified copies only); one PUT, so every reader sees the old pointer or the
        new one. A rejected candidate is refused
        (:class:`models.store_base.RejectedCandidateError`)."""
        check_activatable(self.verified(deployment, version)[1])
        self._check_lock(deployment)  # a repair that lost its lock activates nothing
        body = {
            "version": version,
            "activated": utc_now_iso(),
            "by": f"{socket.gethostname()}:{os.getpid()}",
            "nonce": uuid.uuid4().hex,
        }
        self.objects.put(self._key(deployment, ACTIVE), json.dumps(body).encode() + b"\n")

    # --- repairs ---

    @contextlib.contextmanager
    def repair_lock(self, deployment: str, *, blocking: bool = False) -> Iterator[str]:
        """Hold the deployment's repair lock for the ``with`` block; yields the lock's key.

        A lease lock object (:mod:`models.s3_lock`): created with a conditional put,
        renewed every third of ``lock_lease_s`` while the block runs, deleted at its end. A
        holder killed without releasing it blocks repairs until its lease has run out.
        While it is held, :meth:`publish` and :meth:`activate` of the deployment through this
        store raise :class:`models.store_names.LockLostError` once the lock is lost.
        """
        self._require_deployment(deployment)
        renew = self.objects
        if not self._client_given:  # short timeouts: a renewal never outlasts the lease
            renew = Objects(self.where.bucket, lock_client(self.lock_lease_s))
        lock = LeaseLock(
            self.objects,
            self._key(deployment, REPAIR_LOCK),
            lease_s=self.lock_lease_s,
            renew_objects=renew,
        )
        with lock.held(f"a repair of deployment {deployment!r}", blocking=blocking) as key:
            self._held[deployment] = lock
            try:
                yield key
            finally:
                self._held.pop(deployment, None)

    # --- housekeeping ---

    def cleanup(
        self, deployment: str | None = None, *, older_than_s: float = DEFAULT_STALE_TMP_SECONDS
    ) -> list[str]:
        """Remove blobs no manifest lists (older than ``older_than_s``, so those of a publish
        still running stay), and local copies of versions that are gone; returns them.

        Each blob is looked at again (one HEAD) right before it is deleted and kept if it was
        written since the cutoff: a publish may have uploaded it again after the listing. A
        version deleted while the manifests are read is skipped."""
        names = [deployment] if deployment is not None else self.deployments()
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        removed: list[str] = []
        published: dict[str, set[str]] = {}
        for name in names:
            versions = self._listed(name, VERSIONS)
            published[name] = set(versions)
            listed: set[str] = set()
            for v in versions:
                try:
                    listed.update(self.manifest(name, v).files.values())
                except UnknownVersionError:  # deleted meanwhile: its blobs are unused
                    published[name].discard(v)
            prefix = self._key(name, BLOBS) + "/"
            for key, modified in list(self.objects.listing(prefix)):
                if key[len(prefix) :] in listed or modified >= cutoff:
                    continue
                now_modified = self.objects.last_modified(key)
                if now_modified is None or now_modified >= cutoff:  # gone, or uploaded again
                    continue
                self.objects.delete(key)
                removed.append(self._url(key))
        kept = self.cache.cleanup(
            lambda d, v: d not in published or v in published[d], older_than_s
        )
        return removed + [str(p) for p in kept]


def _valid_deployment(name: str) -> bool:
    try:
        check_deployment(name)
    except StoreError:
        return False
    return True
