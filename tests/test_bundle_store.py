"""Model bundles (write / verify / load) and the versioned model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from models.bundle import (
    MANIFEST_NAME,
    BundleError,
    BundleIntegrityError,
    Manifest,
    load_bundle,
    read_manifest,
    verify_bundle,
    write_bundle,
)
from models.classifiers import build_classifier
from models.nets import Net
from models.spec import InputSpec
from models.store import (
    InvalidNameError,
    ModelStore,
    RepairLockedError,
    UnknownDeploymentError,
    UnknownVersionError,
)

SPEC = InputSpec(1, 28, 28, (0.5,), (0.5,))
CLASS_NAMES = [f"class_{i}" for i in range(10)]
DEPLOYMENT = "fashion"


def tiny_net(seed: int) -> Net:
    torch.manual_seed(seed)
    module = build_classifier("small_cnn", SPEC, len(CLASS_NAMES), width=2).eval()
    return Net(module, "zoo", SPEC, len(CLASS_NAMES), arch="small_cnn", arch_kwargs={"width": 2})


def validation_set() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "images": torch.randint(0, 256, (6, *SPEC.shape), dtype=torch.uint8, generator=generator),
        "labels": torch.arange(6) % len(CLASS_NAMES),
    }


def write(directory: Path, version: str = "v0001", parent: str | None = None) -> Manifest:
    return write_bundle(
        directory,
        name=DEPLOYMENT,
        version=version,
        parent=parent,
        spec=SPEC,
        class_names=CLASS_NAMES,
        nets={"badnet": tiny_net(0), "goodnet": tiny_net(1)},
        tensors={"validation": validation_set()},
        metrics={"clean_accuracy": {"badnet": 0.9, "goodnet": 0.88}},
        provenance={"alpha": 0.1, "gamma": 0.3, "theta": 0.03},
        extra_files={"report.md": b"# report\n", "plots/grid.png": b"\x89PNG fake"},
    )


# --- bundles ---


def test_bundle_round_trip(tmp_path: Path) -> None:
    manifest = write(tmp_path)
    assert sorted(manifest.files) == [
        "badnet.safetensors",
        "goodnet.safetensors",
        "plots/grid.png",
        "report.md",
        "validation.safetensors",
    ]
    assert datetime.fromisoformat(manifest.created).utcoffset() == datetime.now(UTC).utcoffset()
    assert read_manifest(tmp_path) == manifest == verify_bundle(tmp_path)
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert on_disk["nets"]["badnet"] == {
        "format": "zoo",
        "file": "badnet.safetensors",
        "arch": "small_cnn",
        "arch_kwargs": {"width": 2},
    }
    bundle = load_bundle(tmp_path)
    assert bundle.spec == SPEC and bundle.class_names == CLASS_NAMES
    assert bundle.roles == ["badnet", "goodnet"]
    images = validation_set()["images"]
    for role, seed in (("badnet", 0), ("goodnet", 1)):
        assert torch.equal(bundle.net(role).logits(images), tiny_net(seed).logits(images))
    assert bundle.net("badnet") is not bundle.net("badnet")
    loaded = bundle.tensors("validation")
    assert all(torch.equal(loaded[k], v) for k, v in validation_set().items())
    with pytest.raises(KeyError, match="no net 'cleannet'"):
        bundle.net("cleannet")


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path)
    weights = tmp_path / "goodnet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"goodnet\.safetensors"):
        verify_bundle(tmp_path)
    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_bundle(tmp_path)


def test_files_changed_after_loading_are_refused_when_read(tmp_path: Path) -> None:
    # load_bundle verified every file; a file swapped afterwards (a shared volume) is refused
    # by the read that deserialises it, not loaded.
    write(tmp_path)
    bundle = load_bundle(tmp_path)
    swapped = tmp_path / "swap"
    write(swapped)
    # same kind of content, other bytes: another net and another validation set
    (tmp_path / "badnet.safetensors").write_bytes((swapped / "goodnet.safetensors").read_bytes())
    with pytest.raises(BundleIntegrityError, match=r"badnet\.safetensors.*sha256"):
        bundle.net("badnet")
    assert bundle.net("goodnet").arch == "small_cnn"
    data = bytearray((tmp_path / "validation.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "validation.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"validation\.safetensors.*sha256"):
        bundle.tensors("validation")
    (tmp_path / "goodnet.safetensors").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        bundle.net("goodnet")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "no_such_net"}, "unknown architecture 'no_such_net'"),
        ({"arch": None}, "needs its architecture name"),
        ({"arch_kwargs": {"widht": 2}}, "allowed: width"),
        ({"arch_kwargs": {"width": 10**9}}, "less than or equal to 512"),
    ],
)
def test_manifest_net_entries_are_validated(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    write(tmp_path)
    path = tmp_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["nets"]["badnet"].update(change)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match=message):
        read_manifest(tmp_path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path)
    (tmp_path / "plots" / "grid.png").unlink()
    with pytest.raises(BundleIntegrityError, match=r"'plots/grid.png' is missing"):
        load_bundle(tmp_path)


def test_bad_manifests_are_refused(tmp_path: Path) -> None:
    write(tmp_path)
    path = tmp_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"]["../outside"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="invalid file name"):
        verify_bundle(tmp_path)
    path.write_text("{not json")
    with pytest.raises(BundleIntegrityError, match="unreadable"):
        verify_bundle(tmp_path)
    path.unlink()
    with pytest.raises(BundleIntegrityError, match=r"no manifest\.json"):
        verify_bundle(tmp_path)


def test_colliding_bundle_parts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"validation\.safetensors"):
        write_bundle(
            tmp_path,
            name=DEPLOYMENT,
            version="v0001",
            parent=None,
            spec=SPEC,
            class_names=CLASS_NAMES,
            nets={"validation": tiny_net(0)},
            tensors={"validation": validation_set()},
        )


# --- store ---


def publish(store: ModelStore, parent: str | None = None, *, activate: bool = False) -> str:
    return store.publish(
        DEPLOYMENT,
        lambda directory, version: write(directory, version, parent),
        parent,
        activate=activate,
    )


def test_publish_allocates_versions_with_parents(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert publish(store) == "v0001"
    assert publish(store, "v0001") == "v0002"
    assert store.versions(DEPLOYMENT) == ["v0001", "v0002"]
    assert store.manifest(DEPLOYMENT, "v0002").parent == "v0001"
    assert store.active(DEPLOYMENT) is None
    assert store.deployments() == [DEPLOYMENT]
    assert store.path(DEPLOYMENT, "v0002") == tmp_path / DEPLOYMENT / "versions" / "v0002"


def test_activate_load_and_rollback(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store, activate=True)
    publish(store, "v0001", activate=True)
    assert store.active(DEPLOYMENT) == "v0002"
    assert (tmp_path / DEPLOYMENT / "ACTIVE").read_text().strip() == "v0002"
    assert store.load(DEPLOYMENT).manifest.version == "v0002"
    assert store.rollback(DEPLOYMENT) == "v0001"
    assert store.active(DEPLOYMENT) == "v0001"
    assert store.load(DEPLOYMENT, "v0002").manifest.version == "v0002"
    assert store.rollback(DEPLOYMENT, "v0002") == "v0002"
    store.rollback(DEPLOYMENT)
    with pytest.raises(UnknownVersionError, match="nothing to roll back to"):
        store.rollback(DEPLOYMENT)


def test_rollback_goes_to_the_parent_not_the_previous_number(tmp_path: Path) -> None:
    """Two repairs of v0001 (v0002, then v0003): rolling back v0003 serves its parent v0001,
    not v0002, which v0003 never came from."""
    store = ModelStore(tmp_path)
    publish(store, activate=True)
    publish(store, "v0001")
    publish(store, "v0001", activate=True)
    assert store.active(DEPLOYMENT) == "v0003"
    assert store.rollback(DEPLOYMENT) == "v0001"


def test_activate_refuses_a_tampered_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store, activate=True)
    publish(store, "v0001")
    (store.path(DEPLOYMENT, "v0002") / "report.md").write_bytes(b"changed")
    with pytest.raises(BundleIntegrityError, match=r"report\.md"):
        store.activate(DEPLOYMENT, "v0002")
    assert store.active(DEPLOYMENT) == "v0001"


def test_failed_publish_leaves_no_trace(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store, activate=True)

    def crash(directory: Path, version: str) -> Manifest:
        (directory / "badnet.safetensors").write_bytes(b"half written")
        raise RuntimeError("out of disk")

    with pytest.raises(RuntimeError, match="out of disk"):
        store.publish(DEPLOYMENT, crash, "v0001", activate=True)
    with pytest.raises(ValueError, match="store asked for 'v0002'"):
        store.publish(DEPLOYMENT, lambda directory, _v: write(directory, "v0009"), None)
    assert store.versions(DEPLOYMENT) == ["v0001"]
    assert store.active(DEPLOYMENT) == "v0001"
    assert [p.name for p in (tmp_path / DEPLOYMENT).iterdir() if p.name.startswith(".")] == []


def test_crashed_publish_is_ignored_and_cleaned_up(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store)
    leftover = tmp_path / DEPLOYMENT / ".tmp-0123abcd"
    write(leftover, "v0002")
    assert store.versions(DEPLOYMENT) == ["v0001"]
    assert publish(store) == "v0002"
    assert store.cleanup(DEPLOYMENT) == []  # too young: may be a publish still running
    assert store.cleanup(older_than_s=0) == [leftover]
    assert not leftover.exists()


def test_losing_the_race_for_a_version_id_takes_the_next(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)

    def build_while_another_publishes(directory: Path, version: str) -> Manifest:
        assert publish(store) == version  # a concurrent publisher takes our id first
        return write(directory, version)

    assert store.publish(DEPLOYMENT, build_while_another_publishes) == "v0002"
    assert store.versions(DEPLOYMENT) == ["v0001", "v0002"]
    assert verify_bundle(store.path(DEPLOYMENT, "v0002")).version == "v0002"


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "-x", "..", "a b"])
def test_invalid_deployment_names_are_refused(tmp_path: Path, name: str) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(InvalidNameError):
        store.publish(name, lambda directory, version: write(directory, version))
    with pytest.raises(InvalidNameError):
        store.versions(name)
    assert not (tmp_path / "evil").exists()


def test_unknown_deployments_and_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(UnknownDeploymentError, match="unknown deployment 'nope'"):
        store.versions("nope")
    publish(store)
    with pytest.raises(UnknownVersionError, match="no version 'v0007'"):
        store.load(DEPLOYMENT, "v0007")
    with pytest.raises(UnknownVersionError, match="no active version"):
        store.load(DEPLOYMENT)
    with pytest.raises(InvalidNameError):
        store.path(DEPLOYMENT, "../v0001")
    with pytest.raises(UnknownVersionError):
        publish(store, parent="v0042")


# --- import, repair lock, active token ---


def test_import_bundle_publishes_a_copy_under_a_new_version(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write(source, "v0007", parent="v0006")
    (source / "not-listed.txt").write_text("left behind")
    store = ModelStore(tmp_path / "store")
    publish(store)
    assert store.import_bundle(DEPLOYMENT, source) == "v0002"
    assert store.active(DEPLOYMENT) is None
    assert store.import_bundle(DEPLOYMENT, source, activate=True) == "v0003"
    assert store.active(DEPLOYMENT) == "v0003"
    manifest = verify_bundle(store.path(DEPLOYMENT, "v0003"))
    assert manifest.version == "v0003" and manifest.parent is None
    imported = manifest.provenance["imported"]
    assert (imported["source_version"], imported["source_parent"]) == ("v0007", "v0006")
    assert manifest.files == read_manifest(source).files
    assert not (store.path(DEPLOYMENT, "v0003") / "not-listed.txt").exists()
    images = validation_set()["images"]
    assert torch.equal(
        store.load(DEPLOYMENT).net("badnet").logits(images), tiny_net(0).logits(images)
    )
    assert read_manifest(source).version == "v0007"  # the source is left as it was


def test_import_bundle_refuses_a_tampered_bundle(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write(source)
    (source / "report.md").write_bytes(b"# changed\n")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(BundleIntegrityError, match=r"report\.md"):
        store.import_bundle(DEPLOYMENT, source, activate=True)
    assert store.deployments() == []
    with pytest.raises(BundleIntegrityError, match="no manifest"):
        store.import_bundle(DEPLOYMENT, tmp_path / "nothing")


def test_repair_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store)
    with store.repair_lock(DEPLOYMENT) as lock:
        assert lock == tmp_path / DEPLOYMENT / ".repair.lock"
        assert lock.read_text().strip() == str(os.getpid())
        busy = pytest.raises(RepairLockedError, match=rf"already running \(pid {os.getpid()}")
        with busy, store.repair_lock(DEPLOYMENT):
            pass
    with store.repair_lock(DEPLOYMENT, blocking=True):  # free again
        pass
    assert store.versions(DEPLOYMENT) == ["v0001"]  # the lock file is no version
    with pytest.raises(UnknownDeploymentError), store.repair_lock("other"):
        pass


def test_repair_lock_is_held_across_processes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store)
    holder = (
        "import sys, time; from models.store import ModelStore\n"
        f"with ModelStore({str(tmp_path)!r}).repair_lock({DEPLOYMENT!r}):\n"
        "    print('locked', flush=True); sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with (
            pytest.raises(RepairLockedError, match=f"pid {proc.pid}"),
            store.repair_lock(DEPLOYMENT),
        ):
            pass
    finally:
        proc.kill()  # SIGKILL: the kernel drops the lock with the process
        proc.wait()
    with store.repair_lock(DEPLOYMENT):
        pass


def test_active_token_changes_with_every_activation(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store)
    publish(store, "v0001")
    assert store.active_token(DEPLOYMENT) is None
    store.activate(DEPLOYMENT, "v0001")
    first = store.active_token(DEPLOYMENT)
    assert first is not None and first == store.active_token(DEPLOYMENT)
    store.activate(DEPLOYMENT, "v0002")
    second = store.active_token(DEPLOYMENT)
    assert second != first
    store.activate(DEPLOYMENT, "v0002")  # the same version again: still a new file
    assert store.active_token(DEPLOYMENT) != second
    with pytest.raises(UnknownDeploymentError):
        store.active_token("other")


def test_read_file_returns_one_checked_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store)
    assert store.read_file(DEPLOYMENT, "v0001", "plots/grid.png") == b"\x89PNG fake"
    with pytest.raises(FileNotFoundError, match=r"no file 'repair_samples\.png'"):
        store.read_file(DEPLOYMENT, "v0001", "repair_samples.png")
    (store.path(DEPLOYMENT, "v0001") / "report.md").write_bytes(b"# changed\n")
    with pytest.raises(BundleIntegrityError, match=r"report\.md.*sha256"):
        store.read_file(DEPLOYMENT, "v0001", "report.md")
    with pytest.raises(UnknownVersionError):
        store.read_file(DEPLOYMENT, "v0002", "report.md")
