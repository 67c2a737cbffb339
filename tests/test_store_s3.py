"""The model store on S3-compatible object storage, against a real local S3 server (moto's
server mode as a child process; a fresh bucket per test): atomic publish with checksums,
tampered or missing blobs refused, racing publishers, the active pointer and its token,
rollback, delete with tombstones, the lease repair lock across processes (its renewals, and
a lost lock refusing publish and activate), the bounded local cache shared by installers,
cleanup racing a publish, short client timeouts, and two ``nnoculation serve`` processes that
share nothing but the bucket converging on a newly activated version by polling."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import ValidationError

from models.bundle import (
    MANIFEST_NAME,
    BundleIntegrityError,
    Manifest,
    read_manifest,
    verify_bundle,
    write_bundle,
)
from models.classifiers import build_classifier
from models.nets import Net
from models.s3_cache import BundleCache
from models.s3_lock import LeaseLock, lock_client
from models.s3_objects import ConditionConflictError, ConditionFailedError, Objects, make_client
from models.s3_store import S3Store
from models.spec import InputSpec
from models.store import ModelStore
from models.store_names import (
    ActiveVersionError,
    InvalidNameError,
    LockLostError,
    RepairLockedError,
    StoreUnavailableError,
    UnknownDeploymentError,
    UnknownVersionError,
)
from models.store_open import open_store
from nnoculation.benchmarks.processes import Child, free_port, redis_server, wait_until
from nnoculation.cli import main
from nnoculation.online.settings import CommonSettings
from tests.online import DEFAULT_REDIS_URL, DEPLOYMENT, ApiServer, new_prefix, online_env

ROOT = Path(__file__).resolve().parents[1]
SPEC = InputSpec(1, 8, 8, (0.5,), (0.5,))
CLASSES = ["a", "b", "c"]
NAME = "digits"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the whole module."""
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    child = Child([str(server), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log)
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_http(f"{url}/moto-api/", 30, "moto_server to answer")
        yield url
    finally:
        child.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    """boto3's standard variables pointing at the local server (no file configuration)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; returns its ``s3://`` URL with a prefix."""
    for key, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    name = f"nnoc-{uuid.uuid4().hex[:12]}"
    make_client().create_bucket(Bucket=name)
    return f"s3://{name}/models/prod"


def tiny_net(seed: int) -> Net:
    torch.manual_seed(seed)
    module = build_classifier("small_cnn", SPEC, len(CLASSES), width=2).eval()
    return Net(module, "zoo", SPEC, len(CLASSES), arch="small_cnn", arch_kwargs={"width": 2})


def writer(report: bytes = b"# report\n", parent: str | None = None) -> Any:
    """A ``build`` for publish: a tiny bundle whose report.md is ``report``."""

    def build(directory: Path, version: str) -> Manifest:
        return write_bundle(
            directory, name=NAME, version=version, parent=parent, spec=SPEC,
            class_names=CLASSES, nets={"badnet": tiny_net(0), "goodnet": tiny_net(1)},
            extra_files={"report.md": report, "plots/grid.png": b"\x89PNG fake"},
        )  # fmt: skip

    return build


def blob_key(store: S3Store, manifest: Manifest, rel: str) -> str:
    return store.where.key(NAME, "blobs", manifest.files[rel])


def test_publish_then_load_on_another_machine(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "cache-a")
    assert store.deployments() == []
    assert store.publish(NAME, writer()) == "v0001"
    assert store.publish(NAME, writer(b"# two\n", "v0001"), "v0001") == "v0002"
    assert store.versions(NAME) == ["v0001", "v0002"] and store.deployments() == [NAME]
    assert store.manifest(NAME, "v0002").parent == "v0001" and store.active(NAME) is None
    # Another machine: only the bucket in common; its copy is downloaded and verified.
    other = open_store(bucket, tmp_path / "cache-b")
    assert isinstance(other, S3Store) and other.location == bucket
    bundle = other.load(NAME, "v0002")
    assert bundle.path.is_relative_to(tmp_path / "cache-b")
    assert (bundle.path / "report.md").read_bytes() == b"# two\n"
    images = torch.rand(4, *SPEC.shape)
    assert torch.equal(bundle.net("badnet").logits(images), tiny_net(0).logits(images))
    assert read_manifest(bundle.path) == store.manifest(NAME, "v0002")
    # A blob per distinct file: what the versions share is stored once.
    files = [store.manifest(NAME, v).files for v in ("v0001", "v0002")]
    assert files[0]["plots/grid.png"] == files[1]["plots/grid.png"]
    blobs = make_client().list_objects_v2(
        Bucket=store.where.bucket, Prefix=store.where.key(NAME, "blobs/")
    )
    assert blobs["KeyCount"] == len({*files[0].values(), *files[1].values()}) < 8
    with pytest.raises(UnknownVersionError, match="no version 'v0007'"):
        other.path(NAME, "v0007")
    with pytest.raises(UnknownDeploymentError):
        other.versions("nope")
    with pytest.raises(InvalidNameError):
        other.path(NAME, "../v0001")


def test_tampered_or_missing_blobs_are_refused(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "cache-a")
    store.publish(NAME, writer(), activate=True)
    store.publish(NAME, writer(b"# two\n", "v0001"), "v0001")
    manifest = store.manifest(NAME, "v0002")
    client = make_client()
    client.put_object(
        Bucket=store.where.bucket, Key=blob_key(store, manifest, "report.md"), Body=b"# evil\n"
    )
    reader = S3Store(bucket, tmp_path / "cache-b")
    with pytest.raises(BundleIntegrityError, match=r"report\.md.*sha256"):
        reader.load(NAME, "v0002")
    with pytest.raises(BundleIntegrityError, match=r"report\.md"):
        reader.activate(NAME, "v0002")
    assert reader.active(NAME) == "v0001"
    cached = reader.cache.root / NAME
    assert list(cached.iterdir()) == []  # nothing unverified is kept, not even a temp dir
    client.delete_object(Bucket=store.where.bucket, Key=blob_key(store, manifest, "report.md"))
    with pytest.raises(BundleIntegrityError, match=r"report\.md.*missing"):
        reader.path(NAME, "v0002")
    # A damaged local copy is not served: it is downloaded again.
    copy = reader.path(NAME, "v0001")
    (copy / "plots" / "grid.png").write_bytes(b"changed on disk")
    assert (reader.path(NAME, "v0001") / "plots" / "grid.png").read_bytes() == b"\x89PNG fake"


def test_racing_publishers_get_distinct_ids(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "cache")
    # The server refuses a second manifest under one key (what the race relies on).
    key = store.where.key(NAME, "versions", "v0009", "manifest.json")
    store.objects.put(key, b"{}", if_none_match=True)
    with pytest.raises(ConditionFailedError):
        store.objects.put(key, b"{}", if_none_match=True)
    store.objects.delete(key)

    def publish_meanwhile(directory: Path, version: str) -> Manifest:
        rival = S3Store(bucket, tmp_path / "rival")
        assert rival.publish(NAME, writer(b"# rival\n")) == version  # takes our id first
        return writer(b"# ours\n")(directory, version)

    assert store.publish(NAME, publish_meanwhile) == "v0002"
    assert (store.path(NAME, "v0002") / "report.md").read_bytes() == b"# ours\n"
    assert store.manifest(NAME, "v0002").version == "v0002"
    # Several processes' worth of publishers at once: every one gets its own id.
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            results[i] = S3Store(bucket, tmp_path / f"c{i}").publish(NAME, writer(f"{i}".encode()))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(set(results.values())) == 4, (errors, results)
    assert store.versions(NAME) == [f"v{n:04d}" for n in range(1, 7)]
    reader = S3Store(bucket, tmp_path / "reader")
    for i, version in results.items():
        assert (reader.path(NAME, version) / "report.md").read_bytes() == f"{i}".encode()


def test_active_pointer_token_and_rollback(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "cache")
    store.publish(NAME, writer())
    store.publish(NAME, writer(b"# two\n", "v0001"), "v0001")
    store.publish(NAME, writer(b"# three\n"))
    assert store.active(NAME) is None and store.active_token(NAME) is None
    store.activate(NAME, "v0001")
    first = store.active_token(NAME)
    assert first is not None and first == store.active_token(NAME)
    store.activate(NAME, "v0002")
    second = store.active_token(NAME)
    assert second != first
    store.activate(NAME, "v0002")  # the same version again: still a new token
    assert store.active_token(NAME) not in (first, second)
    poller = S3Store(bucket, tmp_path / "poller")
    assert poller.active(NAME) == "v0002" and poller.active_token(NAME) == store.active_token(NAME)
    assert poller.load(NAME).manifest.version == "v0002"
    assert store.rollback(NAME) == "v0001"  # the parent
    assert poller.active(NAME) == "v0001"
    assert store.rollback(NAME, "v0003") == "v0003"
    assert store.rollback(NAME) == "v0002"  # no parent: the one before
    # A second child of v0001: its rollback serves v0001, not v0003 (the number before it).
    assert store.publish(NAME, writer(b"# four\n", "v0001"), "v0001", activate=True) == "v0004"
    assert store.rollback(NAME) == "v0001"
    with pytest.raises(UnknownDeploymentError):
        store.active_token("other")


def test_delete_leaves_a_tombstone_and_cleanup_drops_unused_blobs(
    bucket: str, tmp_path: Path
) -> None:
    store = S3Store(bucket, tmp_path / "cache")
    store.publish(NAME, writer(), activate=True)
    store.publish(NAME, writer(b"# two\n", "v0001"), "v0001", activate=True)
    unused = blob_key(store, store.manifest(NAME, "v0002"), "report.md")
    with pytest.raises(ActiveVersionError):
        store.delete(NAME, "v0002")
    store.rollback(NAME)
    store.delete(NAME, "v0002")
    assert store.versions(NAME) == ["v0001"]
    with pytest.raises(UnknownVersionError):
        store.path(NAME, "v0002")
    assert not (store.cache.root / NAME / "v0002").exists()
    assert store.publish(NAME, writer(b"# three\n")) == "v0003"  # v0002 is never reused

    def publish_and_delete_meanwhile(directory: Path, version: str) -> Manifest:
        rival = S3Store(bucket, tmp_path / "rival")
        assert rival.publish(NAME, writer(b"# short-lived\n")) == version
        rival.delete(NAME, version)  # its manifest is gone, its tombstone is not
        return writer(b"# four\n")(directory, version)

    assert store.publish(NAME, publish_and_delete_meanwhile) == "v0005"
    assert store.versions(NAME) == ["v0001", "v0003", "v0005"]
    store.delete(NAME, "v0005")
    assert store.cleanup(NAME) == []  # too young: may belong to a publish still running
    prefix = store.where.key(NAME, "blobs/")
    blobs = {key for key, _ in store.objects.listing(prefix)}
    kept = {
        prefix + sha for v in ("v0001", "v0003") for sha in store.manifest(NAME, v).files.values()
    }
    removed = store.cleanup(NAME, older_than_s=0)
    url = f"s3://{store.where.bucket}/"
    assert sorted(removed) == sorted(url + key for key in blobs - kept) and url + unused in removed
    assert {key for key, _ in store.objects.listing(prefix)} == kept
    fresh = S3Store(bucket, tmp_path / "fresh")
    assert [fresh.load(NAME, v).manifest.version for v in ("v0001", "v0003")] == ["v0001", "v0003"]


LOCK_HOLDER = """
import sys
from models.s3_store import S3Store
store = S3Store(sys.argv[1], sys.argv[2], lock_lease_s=6)
with store.repair_lock(sys.argv[3]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_repair_lock_is_exclusive_renewed_and_expires_after_a_crash(
    bucket: str, tmp_path: Path
) -> None:
    # A 6 s lease, waits of 1.5 leases: safe against S3's 1 s timestamps on a loaded machine.
    store = S3Store(bucket, tmp_path / "cache", lock_lease_s=6)
    store.publish(NAME, writer())
    other = S3Store(bucket, tmp_path / "other", lock_lease_s=6)
    with store.repair_lock(NAME) as key:
        assert key == store.where.key(NAME, "REPAIR_LOCK")
        with pytest.raises(RepairLockedError, match="already running"), other.repair_lock(NAME):
            pass
    with other.repair_lock(NAME):  # released at the end of the block
        pass
    with pytest.raises(UnknownDeploymentError), store.repair_lock("nope"):
        pass
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, bucket, str(tmp_path / "holder"), NAME],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        threading.Event().wait(9.0)  # longer than the lease: the holder renews it
        with pytest.raises(RepairLockedError, match=r"lease 6 s"), store.repair_lock(NAME):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no release: the lease has to run out
        proc.wait()

    def taken() -> bool:
        with store.repair_lock(NAME):
            return True

    wait_until(taken, 20, "the dead holder's lease to run out", interval_s=0.5)


def test_a_lost_repair_lock_refuses_publish_and_activate(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "cache", lock_lease_s=30)
    store.publish(NAME, writer(), activate=True)
    store.publish(NAME, writer(b"# two\n", "v0001"), "v0001")
    client = make_client()
    key = store.where.key(NAME, "REPAIR_LOCK")
    intruder = json.dumps({"holder": "elsewhere:1:x", "lease_s": 30}).encode()

    def take_over() -> None:  # what another process does once it thinks our lease ran out
        client.put_object(Bucket=store.where.bucket, Key=key, Body=intruder)

    with store.repair_lock(NAME):
        store.publish(NAME, writer(b"# three\n"))  # still ours: allowed
        take_over()  # the renewer (every 10 s) has not noticed: the check reads the object
        with pytest.raises(LockLostError, match="lost the lock"):
            store.publish(NAME, writer(b"# late\n"))
        with pytest.raises(LockLostError):
            store.activate(NAME, "v0002")
        with pytest.raises(RepairLockedError):  # a LockLostError: the CLI exits 6
            store.rollback(NAME, "v0002")
    assert store.versions(NAME) == ["v0001", "v0002", "v0003"] and store.active(NAME) == "v0001"
    assert json.loads(client.get_object(Bucket=store.where.bucket, Key=key)["Body"].read()) == {
        "holder": "elsewhere:1:x", "lease_s": 30,
    }  # fmt: skip
    store.publish(NAME, writer(b"# four\n"))  # no lock held: nothing to check
    client.delete_object(Bucket=store.where.bucket, Key=key)
    # The renewal thread notices a takeover by itself (and stops renewing).
    quick = S3Store(bucket, tmp_path / "quick", lock_lease_s=3)
    with quick.repair_lock(NAME):
        lock = quick._held[NAME]
        take_over()
        wait_until(lock.lost.is_set, 10, "the renewer to notice the takeover", interval_s=0.2)
        with pytest.raises(LockLostError):
            quick.activate(NAME, "v0002")
    assert store.active(NAME) == "v0001"


class FlakyObjects(Objects):
    """Objects whose next puts fail as scripted: ``retried`` (the write succeeds, then its
    retry answers 412, as botocore's does), ``conflict`` (409, nothing written), ``error``."""

    def __init__(self, bucket: str, faults: list[str]) -> None:
        super().__init__(bucket)
        self.faults, self.puts = faults, 0

    def put(self, key: str, body: bytes, **kwargs: Any) -> str:
        self.puts += 1
        fault = self.faults.pop(0) if self.faults else None
        if fault == "retried":
            super().put(key, body, **kwargs)
            raise ConditionFailedError(f"{key}: PreconditionFailed (a retry of a stored put)")
        if fault == "conflict":
            raise ConditionConflictError(f"{key}: ConditionalRequestConflict")
        if fault == "error":
            raise RuntimeError("not a StoreError: the renewer must survive it too")
        return super().put(key, body, **kwargs)


def test_renewals_survive_retried_puts_conflicts_and_errors(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "cache")
    store.publish(NAME, writer())
    key = store.where.key(NAME, "REPAIR_LOCK")
    renew = FlakyObjects(store.where.bucket, ["retried", "conflict", "error"])
    lock = LeaseLock(store.objects, key, lease_s=3, renew_objects=renew)
    with lock.held("a test repair"):
        wait_until(lambda: renew.puts >= 4, 10, "four renewals", interval_s=0.1)
        assert not lock.lost.is_set()
        lock.check()  # still ours
        rival = LeaseLock(store.objects, key, lease_s=3)
        with pytest.raises(RepairLockedError), rival.held("a rival repair"):
            pass
    assert not store.objects.exists(key)  # released with the ETag the renewer adopted


def test_a_hung_server_costs_seconds_not_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for key, value in aws_env(f"http://127.0.0.1:{silent.getsockname()[1]}").items():
            monkeypatch.setenv(key, value)
        config = make_client().meta.config
        assert (config.connect_timeout, config.read_timeout) == (3, 10)
        assert config.retries == {"mode": "standard", "total_max_attempts": 3}
        lock_config = lock_client(30).meta.config  # the default lease
        assert (lock_config.connect_timeout, lock_config.read_timeout) == (2.25, 2.25)
        assert lock_config.retries["total_max_attempts"] == 1
        objects = Objects("nnoc-hung", lock_client(15))  # a renewal of a 15 s lease
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="timeout"):
            objects.put("k", b"renewal", if_match='"etag"')
        assert time.monotonic() - started < 15 / 3


def local_fetch(source: Path, manifest: Manifest) -> Any:
    """A cache ``fetch`` that copies blobs from a bundle on disk."""
    by_sha = {sha: source / rel for rel, sha in manifest.files.items()}

    def fetch(sha256: str, target: Path) -> str | None:
        shutil.copyfile(by_sha[sha256], target)
        return hashlib.sha256(target.read_bytes()).hexdigest()

    return fetch


def test_installers_of_one_version_keep_the_first_copy(tmp_path: Path) -> None:
    source = tmp_path / "source"
    manifest = writer()(source, "v0001")
    data, fetch = (source / MANIFEST_NAME).read_bytes(), local_fetch(source, manifest)
    cache = BundleCache(tmp_path / "cache")
    first = cache.fill(NAME, "v0001", data, fetch, "test")
    inode = first.stat().st_ino
    # Another worker downloaded the same version meanwhile: it uses the copy in place (which
    # the first may be loading from) and drops its own.
    assert cache.fill(NAME, "v0001", data, fetch, "test") == first
    assert first.stat().st_ino == inode
    results: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def install() -> None:
        try:
            start.wait(10)
            results.append(cache.fill(NAME, "v0001", data, fetch, "test"))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and results == [first] * 4
    assert first.stat().st_ino == inode and verify_bundle(first).version == "v0001"
    assert [p.name for p in (cache.root / NAME).iterdir()] == ["v0001"]  # no temp dirs left
    # Only a copy that fails verification is replaced.
    (first / "report.md").write_bytes(b"# damaged\n")
    assert cache.fill(NAME, "v0001", data, fetch, "test") == first
    assert first.stat().st_ino != inode and verify_bundle(first).version == "v0001"


def test_the_cache_keeps_the_active_and_the_most_recently_used_versions(
    bucket: str, tmp_path: Path
) -> None:
    store = S3Store(bucket, tmp_path / "publisher")
    for i in range(5):
        store.publish(NAME, writer(f"# {i}\n".encode()))
    store.activate(NAME, "v0001")

    def cached(s: S3Store) -> list[str]:
        return sorted(p.name for p in (s.cache.root / NAME).iterdir())

    assert cached(store) == ["v0001", "v0004", "v0005"]  # 3 by default
    reader = S3Store(bucket, tmp_path / "reader")
    for version in ("v0002", "v0003", "v0004", "v0005"):
        reader.path(NAME, version)
    assert cached(reader) == ["v0003", "v0004", "v0005"]  # v0001 is active but not cached here
    reader.path(NAME, "v0003")  # used again: now the most recently used
    reader.load(NAME)  # the active one
    assert cached(reader) == ["v0001", "v0003", "v0005"]
    assert (reader.path(NAME, "v0004") / "report.md").read_bytes() == b"# 3\n"
    assert cached(reader) == ["v0001", "v0003", "v0004"]
    one = S3Store(bucket, tmp_path / "one", cache_versions=1)
    one.path(NAME, "v0002")
    one.path(NAME, "v0003")
    assert cached(one) == ["v0003"]


def test_cleanup_looks_at_each_blob_again_and_skips_vanished_versions(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3Store(bucket, tmp_path / "cache")
    store.publish(NAME, writer())
    store.publish(NAME, writer(b"# two\n"))
    unused = blob_key(store, store.manifest(NAME, "v0002"), "report.md")
    kept = set(store.manifest(NAME, "v0001").files.values())
    only_v2 = {sha for sha in store.manifest(NAME, "v0002").files.values() if sha not in kept}
    store.delete(NAME, "v0002")
    listing = store.objects.listing

    def listed_long_ago(prefix: str) -> Iterator[tuple[str, datetime]]:
        for key, _modified in listing(prefix):  # as if a publish uploaded it again since
            yield key, datetime(2000, 1, 1, tzinfo=UTC)

    monkeypatch.setattr(store.objects, "listing", listed_long_ago)
    assert store.cleanup(NAME) == []  # each blob's HEAD says it is younger than an hour
    assert store.objects.exists(unused)
    versions = store._listed
    monkeypatch.setattr(  # a version deleted between the listing and reading its manifest
        store, "_listed", lambda d, f: [*versions(d, f), *(["v0009"] if f == "versions" else [])]
    )
    time.sleep(1.1)  # S3's timestamps have 1 s resolution
    removed = store.cleanup(NAME, older_than_s=0)
    assert sorted(removed) == sorted(
        f"s3://{store.where.bucket}/{store.where.key(NAME, 'blobs', sha)}" for sha in only_v2
    )
    assert S3Store(bucket, tmp_path / "fresh").load(NAME, "v0001").manifest.version == "v0001"


def test_read_file_fetches_one_checked_file(bucket: str, tmp_path: Path) -> None:
    store = S3Store(bucket, tmp_path / "publisher")
    store.publish(NAME, writer())
    reader = S3Store(bucket, tmp_path / "reader")
    assert reader.read_file(NAME, "v0001", "plots/grid.png") == b"\x89PNG fake"
    assert not (reader.cache.root / NAME).exists()  # the bundle was not downloaded
    with pytest.raises(FileNotFoundError, match="no file 'repair_samples"):
        reader.read_file(NAME, "v0001", "repair_samples.png")
    with pytest.raises(UnknownVersionError):
        reader.read_file(NAME, "v0009", "report.md")
    key = blob_key(store, store.manifest(NAME, "v0001"), "report.md")
    client = make_client()
    client.put_object(Bucket=store.where.bucket, Key=key, Body=b"# evil\n")
    with pytest.raises(BundleIntegrityError, match=r"report\.md.*sha256"):
        reader.read_file(NAME, "v0001", "report.md")
    client.delete_object(Bucket=store.where.bucket, Key=key)
    with pytest.raises(BundleIntegrityError, match=r"report\.md.*missing"):
        reader.read_file(NAME, "v0001", "report.md")


def test_store_commands_on_a_bucket(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NNOC_STORE_CACHE_DIR", str(tmp_path / "cli-cache"))
    writer()(tmp_path / "bundle", "v0001")
    target = ["--store", bucket, "--deployment", NAME]
    assert main(["store", "import", *target, str(tmp_path / "bundle")]) == 0
    assert main(["store", "import", *target, str(tmp_path / "bundle"), "--activate"]) == 0
    assert main(["store", "list", *target]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[-2].startswith("  v0001 ") and rows[-1].startswith("* v0002 ")
    assert main(["store", "rollback", *target]) == 0
    assert "v0001 is active" in capsys.readouterr().out
    assert S3Store(bucket, tmp_path / "check").active(NAME) == "v0001"
    assert (tmp_path / "cli-cache").is_dir()
    orphan = S3Store(bucket, tmp_path / "check").where.key(NAME, "blobs", "0" * 64)
    make_client().put_object(Bucket=bucket[5:].split("/")[0], Key=orphan, Body=b"left over")
    assert main(["store", "cleanup", "--store", bucket]) == 0  # younger than an hour: kept
    assert "0 removed from" in capsys.readouterr().out
    time.sleep(1.1)  # S3's timestamps have 1 s resolution
    assert main(["store", "cleanup", "--store", bucket, "--older-than", "0"]) == 0
    out = capsys.readouterr().out
    assert f"removed {bucket[:5]}{bucket[5:].split('/')[0]}/{orphan}" in out and "1 removed" in out


def test_settings_take_a_directory_or_a_checked_s3_url(tmp_path: Path) -> None:
    local = CommonSettings(store_root=tmp_path / "store")
    assert isinstance(local.open_store(), ModelStore) and local.local_store_dir() == Path(
        tmp_path / "store"
    )
    remote = CommonSettings(store_root="s3://my-bucket/a/b", store_cache_dir=tmp_path / "c")
    assert remote.local_store_dir() is None
    for bad in ("s3://Bad_Bucket/x", "s3://ok-bucket/../x", "s3://ok-bucket/a//b", "s3://"):
        with pytest.raises(ValidationError, match="store_root"):
            CommonSettings(store_root=bad)
    # Without the optional boto3, an s3:// store is refused at start with the install line.
    without_boto3 = (
        "import sys; sys.modules['boto3'] = None\n"
        "from nnoculation.online.settings import CommonSettings\n"
        "CommonSettings(store_root='s3://my-bucket/a')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", without_boto3], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "pip install 'nnoculation[s3]'" in done.stderr


def test_a_repair_job_publishes_into_the_bucket(
    bucket: str, tmp_path: Path, tiny_deployment: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's job path on S3: the lease lock, the engine, publish and activate."""
    import redis

    from nnoculation.online.keys import Keys
    from nnoculation.online.quarantine import QuarantineEntry
    from tests.conftest import synthetic_set
    from tests.deployment_fixtures import triggered
    from worker.jobs import Context, execute
    from worker.settings import WorkerSettings

    source, attack, _ = tiny_deployment
    S3Store(bucket, tmp_path / "publisher").import_bundle(DEPLOYMENT, source, activate=True)
    prefix = new_prefix()
    for key, value in {
        "REDIS_URL": DEFAULT_REDIS_URL, "KEY_PREFIX": prefix, "DEPLOYMENT": DEPLOYMENT,
        "STORE_ROOT": bucket, "STORE_CACHE_DIR": str(tmp_path / "worker-cache"),
        "REPAIR_PROFILE": "mean-diff", "REPAIR_OPTIONS": '{"theta": 0.9, "finetune_epochs": 2}',
    }.items():  # fmt: skip
        monkeypatch.setenv(f"NNOC_{key}", value)
    settings = WorkerSettings()
    assert settings.checkpoint_dir("r1") == tmp_path / "worker-cache" / ".work" / DEPLOYMENT / "r1"
    ctx = Context.from_settings(settings)
    try:
        for image in triggered(attack, synthetic_set(40, seed=71).images):
            ctx.quarantine.add(QuarantineEntry(image, 0, 1, "v0001", 0.0))
        rid = ctx.repairs.start("v0001", "admin", 40).repair_id
        result = execute(ctx, rid, 1)
        assert result["status"] == "published" and result["version"] == "v0002", result
        reader = S3Store(bucket, tmp_path / "reader")
        assert reader.active(DEPLOYMENT) == "v0002"
        assert reader.manifest(DEPLOYMENT, "v0002").parent == "v0001"
        assert reader.load(DEPLOYMENT).manifest.provenance["repairs"]
        assert not reader.objects.exists(reader.where.key(DEPLOYMENT, "REPAIR_LOCK"))
    finally:
        client = redis.Redis.from_url(DEFAULT_REDIS_URL)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.delete(f"rq:queue:{Keys(prefix, DEPLOYMENT).queue}")


def test_two_api_processes_sharing_only_the_bucket_converge(
    bucket: str, s3_endpoint: str, tmp_path: Path, tiny_deployment: Any
) -> None:
    source, _attack, _ = tiny_deployment
    store = S3Store(bucket, tmp_path / "publisher-cache")
    store.import_bundle(DEPLOYMENT, source, activate=True)
    with redis_server(tmp_path / "redis") as redis:
        apis = []
        for i in range(2):  # own key prefix (so no announcement reaches the other) and cache
            cache = tmp_path / f"cache{i}"
            env = online_env(bucket, redis.url, new_prefix(), tmp_path / f"api{i}",
                             store_cache_dir=cache, poll_interval_s=0.5)  # fmt: skip
            env.update(aws_env(s3_endpoint))
            apis.append(ApiServer(env, tmp_path / f"api{i}.log"))
        try:
            for api in apis:
                api.wait_ready(90)
            assert [httpx.get(f"{a.url}/readyz").json()["version"] for a in apis] == ["v0001"] * 2
            new = store.import_bundle(DEPLOYMENT, source, activate=True)  # no announcement

            def converged() -> bool:
                return all(httpx.get(f"{a.url}/readyz").json()["version"] == new for a in apis)

            wait_until(converged, 30, "both API processes to serve the new version")
        finally:
            for api in apis:
                api.stop()
    for i in range(2):
        assert (tmp_path / f"cache{i}" / bucket[5:].replace("/", "~") / DEPLOYMENT / new).is_dir()
