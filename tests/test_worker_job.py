"""The repair job in-process (``worker.jobs.execute``), against real Redis and a real store: a
repair that passes the gate is published, activated, announced and its inputs archived; one
the gate refuses leaves the active version alone and keeps a rejected candidate; a cancelled
one gives its inputs back; a stale attempt does nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.store import ModelStore
from nnoculation.online.quarantine import QuarantineEntry
from nnoculation.online.repairs import CANCEL_REQUESTED
from nnoculation.repair.relapse import TARGETS
from tests.conftest import synthetic_set
from tests.deployment_fixtures import triggered
from tests.online import DEFAULT_REDIS_URL, DEPLOYMENT, forget_prefix, new_prefix, publish
from worker import jobs
from worker.jobs import Context, execute
from worker.settings import WorkerSettings


def worker_env(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch, **extra: str) -> str:
    """Publish ``source`` into a store under ``tmp_path`` and point the worker's settings
    (``NNOC_*``, plus ``extra``) at it and at a fresh Redis key prefix; returns the prefix."""
    publish(tmp_path / "store", source)
    prefix = new_prefix()
    for key, value in {
        "REDIS_URL": DEFAULT_REDIS_URL, "KEY_PREFIX": prefix, "DEPLOYMENT": DEPLOYMENT,
        "STORE_ROOT": str(tmp_path / "store"), "WORK_DIR": str(tmp_path / "work"),
        "REPAIR_PROFILE": "mean-diff", "REPAIR_BACKOFF_S": "0", **extra,
    }.items():  # fmt: skip
        monkeypatch.setenv(f"NNOC_{key}", value)
    return prefix


@pytest.fixture
def setup(
    tmp_path: Path, tiny_deployment: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Context, Any]]:
    source, attack, _ = tiny_deployment
    prefix = worker_env(tmp_path, source, monkeypatch)
    yield Context.from_settings(WorkerSettings()), attack
    forget_prefix(prefix)


def quarantine(ctx: Context, attack: Any, count: int = 40) -> list[str]:
    images = triggered(attack, synthetic_set(count, seed=71).images)
    shas = []
    for image in images:
        entry = QuarantineEntry(image, 0, 1, "v0001", time.time())
        ctx.quarantine.add(entry)
        shas.append(entry.sha256)
    return shas


def with_options(ctx: Context, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Context:
    monkeypatch.setenv("NNOC_REPAIR_OPTIONS", json.dumps(options))
    return Context(WorkerSettings(), ctx.store, ctx.quarantine, ctx.repairs)


def test_a_passing_repair_is_published_activated_announced_and_archived(
    setup: tuple[Context, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, attack = setup
    ctx = with_options(ctx, monkeypatch, theta=0.9, finetune_epochs=2)
    shas = quarantine(ctx, attack)
    rid = ctx.repairs.start("v0001", "admin", len(shas)).repair_id
    pubsub = ctx.repairs.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(ctx.repairs.keys.channel)
    result = execute(ctx, rid, 1)
    assert result["status"] == "published" and result["version"] == "v0002"
    store: ModelStore = ctx.store
    assert store.active(DEPLOYMENT) == "v0002"
    assert store.manifest(DEPLOYMENT, "v0002").parent == "v0001"
    record = ctx.repairs.get(rid)
    assert record is not None and record["status"] == "published" and record["entries"] == 40
    assert record["holdout"]["badnet_after"] > 0 and ctx.repairs.current() is None
    # The relapse (the BadNet's suspect label stands out in this quarantine) reaches the
    # repair record and the published version's provenance, as the same figure.
    assert isinstance(record["relapse"], float) and 0 <= record["relapse"] <= 1
    assert isinstance(record["elapsed_s"], float) and record["elapsed_s"] > 0  # at its last stage
    repaired = store.manifest(DEPLOYMENT, "v0002").provenance["repairs"][-1]
    assert repaired["relapse"] == record["relapse"]
    assert record["relapse_basis"] == repaired["relapse_basis"] == TARGETS  # what it judged
    assert {i.sha256 for i in ctx.quarantine.archived(rid)} == set(shas)
    assert ctx.quarantine.pending_count("v0001") == 0
    deadline, message = time.monotonic() + 5, None
    while message is None and time.monotonic() < deadline:  # skips the subscribe confirmation
        message = pubsub.get_message(timeout=1)
    assert message is not None and json.loads(message["data"])["version"] == "v0002"


def test_a_gated_repair_keeps_a_candidate_activates_nothing_and_says_why(
    setup: tuple[Context, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, attack = setup
    # A learning rate this high wrecks both nets: the gate must refuse them.
    ctx = with_options(ctx, monkeypatch, theta=0.01, finetune_lr=5.0, finetune_epochs=2)
    shas = quarantine(ctx, attack)
    rid = ctx.repairs.start("v0001", "auto", len(shas)).repair_id
    result = execute(ctx, rid, 1)
    assert result["status"] == "gated" and result["candidate"] == "v0002"
    # The repaired nets are kept as a rejected candidate; the active version is untouched.
    assert ctx.store.versions(DEPLOYMENT) == ["v0001", "v0002"]
    assert ctx.store.active(DEPLOYMENT) == "v0001"
    gate = ctx.store.manifest(DEPLOYMENT, "v0002").provenance["candidate"]
    assert gate["status"] == "rejected" and "below the baseline" in gate["reason"]
    record = ctx.repairs.get(rid)
    assert record is not None and record["status"] == "gated"
    assert "below the baseline" in record["reason"] and record["candidate_version"] == "v0002"
    assert len(ctx.quarantine.archived(rid)) == len(shas)  # consumed, kept as evidence


def test_a_repair_cancelled_before_it_starts_leaves_its_inputs_pending(
    setup: tuple[Context, Any],
) -> None:
    ctx, attack = setup
    shas = quarantine(ctx, attack)
    rid = ctx.repairs.start("v0001", "admin", len(shas)).repair_id
    ctx.repairs.update(rid, status=CANCEL_REQUESTED)
    assert execute(ctx, rid, 1)["status"] == "cancelled"
    assert ctx.quarantine.pending_count("v0001") == len(shas)
    assert ctx.store.versions(DEPLOYMENT) == ["v0001"] and ctx.repairs.current() is None


def test_a_repair_cancelled_mid_run_gives_its_claimed_inputs_back(
    setup: tuple[Context, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled after its inputs were claimed (the test above cancels before the claim):
    the claim goes back to pending, nothing is archived and no version is published."""
    ctx, attack = setup
    shas = quarantine(ctx, attack)
    rid = ctx.repairs.start("v0001", "admin", len(shas)).repair_id
    seen_at_cancel: list[tuple[int, int]] = []  # (pending, claimed) when the operator cancelled
    reporting = jobs._progress

    def cancelling(ctx_: Context, repair_id: str) -> Any:
        report = reporting(ctx_, repair_id)

        def on_progress(p: Any) -> None:
            report(p)
            if not seen_at_cancel:  # the first progress report comes after the claim
                claimed = len(ctx_.quarantine.claimed(repair_id))
                seen_at_cancel.append((ctx_.quarantine.pending_count("v0001"), claimed))
                ctx_.repairs.update(repair_id, status=CANCEL_REQUESTED)

        return on_progress

    monkeypatch.setattr(jobs, "_progress", cancelling)
    assert execute(ctx, rid, 1)["status"] == "cancelled"
    assert seen_at_cancel == [(0, len(shas))]  # it was cancelled holding every input
    assert ctx.quarantine.pending_count("v0001") == len(shas)
    assert ctx.quarantine.claimed(rid) == [] and ctx.quarantine.archived(rid) == []
    assert ctx.store.versions(DEPLOYMENT) == ["v0001"] and ctx.repairs.current() is None


def test_a_stale_attempt_does_nothing(setup: tuple[Context, Any]) -> None:
    ctx, attack = setup
    shas = quarantine(ctx, attack)
    rid = ctx.repairs.start("v0001", "admin", len(shas)).repair_id
    ctx.repairs.client.hset(ctx.repairs.keys.repair(rid), "attempt", "2")
    assert "stale" in execute(ctx, rid, 1)["skipped"]
    assert ctx.quarantine.pending_count("v0001") == len(shas)
    assert ctx.store.versions(DEPLOYMENT) == ["v0001"]


def test_an_empty_quarantine_fails_the_repair_with_a_reason(setup: tuple[Context, Any]) -> None:
    ctx, _ = setup
    rid = ctx.repairs.start("v0001", "admin", 0).repair_id
    with pytest.raises(ValueError, match="no quarantined inputs"):
        execute(ctx, rid, 1)
    record = ctx.repairs.get(rid)
    assert record is not None and record["status"] == "failed"
    assert "no quarantined inputs" in record["reason"] and ctx.repairs.current() is None
