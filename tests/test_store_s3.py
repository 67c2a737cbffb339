"""The model store on S3-compatible object storage, against a real local S3 server (moto's
server mode as a child process; a fresh bucket per test): atomic publish with checksums,
tampered or missing blobs refused, racing publishers, the active pointer and its token,
rollback, delete with tombstones, the lease repair lock across processes, and two
``nnoculation serve`` processes that share nothing but the bucket converging on a newly
activated version by polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import ValidationError

from models.bundle import BundleIntegrityError, Manifest, read_manifest, write_bundle
from models.classifiers import build_classifier
from models.nets import Net
from models.s3_objects import ConditionFailedError, make_client
from models.s3_store import S3Store
from models.spec import InputSpec
from models.store import ModelStore
from models.store_names import (
    ActiveVersionError,
    InvalidNameError,
    RepairLockedError,
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

    def up() -> bool:
        if not child.alive():
            raise RuntimeError(f"moto_server exited:\n{child.output()[-2000:]}")
        return httpx.get(f"{url}/moto-api/", timeout=2).status_code == 200

    try:
        wait_until(up, 30, "moto_server to answer")
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
store = S3Store(sys.argv[1], sys.argv[2], lock_lease_s=2)
with store.repair_lock(sys.argv[3]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_repair_lock_is_exclusive_renewed_and_expires_after_a_crash(
    bucket: str, tmp_path: Path
) -> None:
    store = S3Store(bucket, tmp_path / "cache", lock_lease_s=2)
    store.publish(NAME, writer())
    other = S3Store(bucket, tmp_path / "other", lock_lease_s=2)
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
        threading.Event().wait(3.0)  # longer than the lease: the holder renews it
        with pytest.raises(RepairLockedError, match=r"lease 2 s"), store.repair_lock(NAME):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no release: the lease has to run out
        proc.wait()

    def taken() -> bool:
        with store.repair_lock(NAME):
            return True

    wait_until(taken, 10, "the dead holder's lease to run out", interval_s=0.5)


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
