"""A failed gate keeps its evidence: a repair the validation gate refuses keeps its nets as a
*rejected candidate* store version that is never activated as it is. On both store backends
(a directory, and S3 on moto's server): ``activate`` and an explicit ``rollback`` refuse it, a
default rollback skips it, ``publish(activate=True)`` never serves it, and only an override
with a reason serves its nets, through a new version whose provenance records the override
(the candidate stays byte for byte as it was). Then the same through the worker's job, the
CLI (exit codes), the admin API (409 / 422) and the dashboard (no Activate button)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.bundle import Manifest, write_bundle
from models.s3_store import S3Store
from models.store import ModelStore, RejectedCandidateError, UnknownVersionError
from models.store_base import BundleStore
from models.store_names import StoreUnavailableError
from nnoculation.benchmarks.processes import wait_until
from nnoculation.cli import EXIT_GATE_FAILED, EXIT_USAGE, main
from nnoculation.online.quarantine import QuarantineEntry
from service.ui import render, session
from tests.conftest import synthetic_set
from tests.deployment_fixtures import triggered
from tests.online import (
    ADMIN_TOKEN,
    DEFAULT_REDIS_URL,
    DEPLOYMENT,
    ApiServer,
    forget_prefix,
    online_env,
)
from tests.test_store_s3 import CLASSES, NAME, SPEC, bucket, s3_endpoint, tiny_net  # noqa: F401
from tests.test_worker_job import worker_env
from worker.jobs import Context, execute
from worker.settings import WorkerSettings

GATE = {
    "status": "rejected",
    "reason": "repaired goodnet hold-out CA 70.00% is below the baseline 90.00% minus theta 3%",
    "failing": ["goodnet"],
    "holdout_ca": {"baseline": 0.9, "goodnet_after": 0.7, "badnet_after": 0.89},
    "theta": 0.03,
    "repaired": "v0001",
}


def writer(parent: str | None = None, gate: dict[str, Any] | None = None, seed: int = 0) -> Any:
    """A ``build`` for publish: a tiny bundle, a rejected candidate when ``gate`` is given."""
    provenance: dict[str, Any] = {"predeploy": {"theta": 0.03}}
    if gate is not None:
        provenance["candidate"] = gate

    def build(directory: Path, version: str) -> Manifest:
        return write_bundle(
            directory, name=NAME, version=version, parent=parent, spec=SPEC,
            class_names=CLASSES, nets={"badnet": tiny_net(seed), "goodnet": tiny_net(seed + 1)},
            provenance=provenance, extra_files={"report.md": f"# {seed}\n".encode()},
        )  # fmt: skip

    return build


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BundleStore:
    """Each store backend: a local directory, and a fresh bucket on moto's S3 server."""
    if request.param == "directory":
        return ModelStore(tmp_path / "store")
    return S3Store(request.getfixturevalue("bucket"), tmp_path / "cache")


def test_a_candidate_is_never_activated_and_an_override_serves_a_recorded_copy(
    store: BundleStore,
) -> None:
    assert store.publish(NAME, writer(), activate=True) == "v0001"
    assert store.publish(NAME, writer("v0001", GATE, seed=2), "v0001") == "v0002"
    token = store.active_token(NAME)
    for refused in (lambda: store.activate(NAME, "v0002"), lambda: store.rollback(NAME, "v0002")):
        with pytest.raises(RejectedCandidateError, match=r"v0002 is a rejected candidate.*70\.00%"):
            refused()
    assert store.active(NAME) == "v0001" and store.active_token(NAME) == token
    # An override needs a reason, a known source, and a rejected candidate to overrule.
    for reason, by, message in [
        ("  ", "cli", "needs a reason"),
        ("x" * 501, "cli", "at most 500"),
        ("ok", "robot", "override by 'robot'"),
    ]:
        with pytest.raises(ValueError, match=message):
            store.activate_override(NAME, "v0002", reason=reason, by=by)
    with pytest.raises(ValueError, match="v0001 is not a rejected candidate"):
        store.activate_override(NAME, "v0001", reason="why not", by="cli")
    assert store.versions(NAME) == ["v0001", "v0002"] and store.active(NAME) == "v0001"

    candidate = store.manifest(NAME, "v0002")
    copy = store.activate_override(NAME, "v0002", reason="  CA fine on our test set ", by="cli")
    assert copy == "v0003" and store.active(NAME) == "v0003"
    assert store.manifest(NAME, "v0002") == candidate  # the candidate itself is untouched
    manifest = store.manifest(NAME, "v0003")
    assert manifest.parent == "v0002" and manifest.files == candidate.files
    assert "candidate" not in manifest.provenance
    override = manifest.provenance["override"]
    assert {k: override[k] for k in ("of", "reason", "by", "gate")} == {
        "of": "v0002", "reason": "CA fine on our test set", "by": "cli", "gate": GATE,
    }  # fmt: skip
    assert override["at"] == manifest.created
    assert store.load(NAME).manifest.version == "v0003"  # verified, loadable
    # Rolling back from the copy skips its parent, the candidate, for the version before it.
    assert store.rollback(NAME) == "v0001" and store.active(NAME) == "v0001"
    store.activate(NAME, "v0003")  # the copy carries its override: no second one needed
    assert store.active(NAME) == "v0003"


def test_an_override_copy_rolls_back_to_its_candidates_parent(store: BundleStore) -> None:
    """v0002 is an unrelated version; v0003 a rejected repair of v0001; v0004 its override
    copy. Rolling back v0004 walks past the candidate to v0001, not to v0002."""
    store.publish(NAME, writer(), activate=True)
    store.publish(NAME, writer(seed=4))
    store.publish(NAME, writer("v0001", GATE, seed=2), "v0001")
    assert store.activate_override(NAME, "v0003", reason="checked by hand", by="cli") == "v0004"
    assert store.rollback(NAME) == "v0001"


def test_rollback_skips_candidates_and_publishing_never_activates_one(store: BundleStore) -> None:
    store.publish(NAME, writer(), activate=True)
    store.publish(NAME, writer("v0001", GATE, seed=2), "v0001")
    # Published with activate=True (as the automatic path would): kept, never active.
    with pytest.raises(RejectedCandidateError):
        store.publish(NAME, writer("v0001", GATE, seed=4), "v0001", activate=True)
    assert store.versions(NAME) == ["v0001", "v0002", "v0003"] and store.active(NAME) == "v0001"
    # A version without a parent (imported): rollback takes the newest earlier non-candidate.
    store.publish(NAME, writer(seed=6), activate=True)
    assert store.rollback(NAME) == "v0001"
    # Nothing but candidates before the active version: nothing to roll back to.
    other = "other"
    store.publish(other, writer(None, GATE, seed=2))
    store.publish(other, writer(seed=6), activate=True)
    with pytest.raises(UnknownVersionError, match="nothing to roll back to"):
        store.rollback(other)
    assert store.active(other) == "v0002"


def test_store_commands_refuse_a_candidate_unless_overridden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(NAME, writer(), activate=True)
    store.publish(NAME, writer("v0001", GATE, seed=2), "v0001")
    where = ["--store", str(tmp_path / "store"), "--deployment", NAME]
    assert main(["store", "activate", *where, "v0002"]) == EXIT_GATE_FAILED
    assert "v0002 is a rejected candidate" in capsys.readouterr().err
    assert main(["store", "rollback", *where, "v0002"]) == EXIT_GATE_FAILED
    assert main(["store", "activate", *where, "v0002", "--override", " "]) == EXIT_USAGE
    assert "needs a reason" in capsys.readouterr().err
    assert store.active(NAME) == "v0001" and store.versions(NAME) == ["v0001", "v0002"]
    assert main(["store", "list", *where]) == 0
    assert "v0002    v0001" in (out := capsys.readouterr().out) and "rejected candidate" in out
    assert main(["store", "activate", *where, "v0002", "--override", "checked by hand"]) == 0
    assert "v0003 (a copy of rejected candidate v0002" in capsys.readouterr().out
    override = store.manifest(NAME, "v0003").provenance["override"]
    assert override["by"] == "cli" and override["reason"] == "checked by hand"
    assert store.active(NAME) == "v0003"
    assert main(["store", "rollback", *where]) == 0 and store.active(NAME) == "v0001"
    assert main(["store", "list", *where]) == 0
    assert "override of rejected candidate v0002" in capsys.readouterr().out


# --- the worker's job, the admin API and the dashboard ---


@pytest.fixture
def online(
    tmp_path: Path, tiny_deployment: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Context, Any, str]]:
    """A worker context over a real store and Redis whose repairs the gate refuses (a learning
    rate that wrecks both nets); yields it, the attack and the Redis key prefix."""
    source, attack, _ = tiny_deployment
    options = '{"theta": 0.01, "finetune_lr": 5.0, "finetune_epochs": 1}'
    prefix = worker_env(tmp_path, source, monkeypatch, REPAIR_OPTIONS=options)
    yield Context.from_settings(WorkerSettings()), attack, prefix
    forget_prefix(prefix)


def gated_repair(ctx: Context, attack: Any, seed: int = 71) -> str:
    for image in triggered(attack, synthetic_set(30, seed=seed).images):
        ctx.quarantine.add(QuarantineEntry(image, 0, 1, "v0001", time.time()))
    rid = ctx.repairs.start("v0001", "auto", 30).repair_id
    result = execute(ctx, rid, 1)
    assert result["status"] == "gated", result
    return rid


def test_a_retried_job_or_a_store_that_refuses_keeps_the_verdict(
    online: tuple[Context, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, attack, _ = online
    store: ModelStore = ctx.store
    # A retry after the candidate was recorded closes the repair without a second candidate.
    rid = ctx.repairs.start("v0001", "auto", 1).repair_id
    ctx.repairs.update(rid, candidate_version="v0009", reason="refused earlier")
    assert execute(ctx, rid, 1)["candidate"] == "v0009"
    record = ctx.repairs.get(rid)
    assert record is not None and record["status"] == "gated"
    assert store.versions(DEPLOYMENT) == ["v0001"]

    # The store refuses the candidate: the repair is still "gated", and says why.
    def refuse(*args: Any, **kwargs: Any) -> str:
        raise StoreUnavailableError("bucket unreachable")

    monkeypatch.setattr(store, "publish", refuse)
    rid = gated_repair(ctx, attack)
    record = ctx.repairs.get(rid)
    assert record is not None and record["status"] == "gated"
    assert "candidate_version" not in record and "bucket unreachable" in record["candidate_error"]
    assert "below the baseline" in record["reason"]


def test_admin_api_and_dashboard_show_candidates_and_refuse_to_activate_them(
    online: tuple[Context, Any, str], tmp_path: Path
) -> None:
    ctx, attack, prefix = online
    rid = gated_repair(ctx, attack)
    assert ctx.store.versions(DEPLOYMENT) == ["v0001", "v0002"]
    env = online_env(tmp_path / "store", DEFAULT_REDIS_URL, prefix, tmp_path, quarantine_n=10_000)
    api = ApiServer(env, tmp_path / "api.log")
    try:
        api.wait_ready()
        with api.admin() as admin:
            record = admin.get(f"/admin/repairs/{rid}").json()
            assert record["status"] == "gated" and record["candidate_version"] == "v0002"
            listed = {v["version"]: v for v in admin.get("/admin/versions").json()["versions"]}
            assert listed["v0002"]["rejected_candidate"] is True
            assert "below the baseline" in listed["v0002"]["candidate"]["reason"]
            assert listed["v0002"]["candidate"]["repaired"] == "v0001"
            assert listed["v0001"]["rejected_candidate"] is False
            # The candidate's repair figures, the relapse among them, are the worker's.
            assert listed["v0002"]["repair"]["relapse"] == record["relapse"] is not None
            assert listed["v0002"]["repair"]["relapse_basis"] == record["relapse_basis"]
            assert record["relapse_basis"] in ("targets", "one-to-one pairs")
            refused = admin.post("/admin/versions/v0002/activate")
            assert refused.status_code == 409 and "rejected candidate" in refused.json()["detail"]
            assert admin.post("/admin/rollback", params={"version": "v0002"}).status_code == 409
            for params, code in [
                ({"override": "true"}, 422),
                ({"override": "true", "reason": " "}, 422),
                ({"override": "true", "reason": "x" * 501}, 422),
                ({"reason": "a reason is no override"}, 409),
            ]:
                answer = admin.post("/admin/versions/v0002/activate", params=params)
                assert answer.status_code == code, (params, answer.text)
            answer = admin.post(
                "/admin/versions/v0001/activate", params={"override": "true", "reason": "why"}
            )
            assert answer.status_code == 409 and "not a rejected candidate" in answer.text
            override = {"override": "true", "reason": "why"}
            assert admin.post("/admin/versions/v0042/activate", params=override).status_code == 404
            assert ctx.store.active(DEPLOYMENT) == "v0001"
            assert ctx.store.versions(DEPLOYMENT) == ["v0001", "v0002"]

            page = dashboard(api)
            row = page.split('data-version="v0002"')[1].split("</tr>")[0]
            assert "rejected candidate" in row and "/versions/v0002/activate" not in row
            assert "/versions/v0001/activate" not in page  # active
            repairs = page.split(f'data-repair="{rid}"')[1].split("</tr>")[0]
            assert "v0002 (rejected candidate)" in repairs

            answer = admin.post(
                "/admin/versions/v0002/activate",
                params={"override": "true", "reason": "evaluated offline: CA is fine"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"active": "v0003", "override_of": "v0002"}
            wait_until(lambda: served(admin) == "v0003", 20, "the API to serve v0003")
            listed = {v["version"]: v for v in admin.get("/admin/versions").json()["versions"]}
            override = listed["v0003"]["override"]
            assert override["of"] == "v0002" and override["by"] == "admin"
            assert override["reason"] == "evaluated offline: CA is fine"
            assert listed["v0003"]["rejected_candidate"] is False and listed["v0003"]["active"]
            assert "override of rejected candidate v0002" in dashboard(api)
            assert admin.post("/admin/rollback").json() == {"active": "v0001"}
    finally:
        api.stop()


def served(admin: httpx.Client) -> str | None:
    return admin.get("/admin/status").json()["this_process"]["version"]  # type: ignore[no-any-return]


def dashboard(api: ApiServer) -> str:
    """The dashboard's HTML, signed in with the admin token."""
    with api.client() as browser:
        login = browser.post("/admin/ui/login", data={"token": ADMIN_TOKEN})
        assert login.status_code == 303 and session.COOKIE in login.cookies
        page = browser.get("/admin/ui")
        assert page.status_code == 200
        return page.text


def test_the_dashboard_offers_no_activate_button_for_a_candidate_and_escapes_overrides() -> None:
    hostile = "<script>alert(1)</script>\"'>"
    view = render.Dashboard(
        status={"deployment": "d", "active_version": "v0001"}, quarantine={}, samples={},
        repairs=[{"id": "r1", "version": "v0001", "status": "gated", "candidate_version": hostile}],
        versions={"versions": [
            {"version": "v0002", "parent": "v0001", "rejected_candidate": True,
             "repair": {"passed_gate": False}},
            {"version": "v0003", "parent": "v0002", "override": {"of": hostile, "by": hostile,
                                                                 "reason": hostile}},
        ]},
        csrf="token",
    )  # fmt: skip
    page = render.dashboard_page(view)
    assert "<script" not in page and "\"'>" not in page
    row = page.split('data-version="v0002"')[1].split("</tr>")[0]
    assert "rejected candidate" in row and "<form" not in row
    assert (
        "/versions/v0003/activate" in page and "override of rejected candidate &lt;script" in page
    )
