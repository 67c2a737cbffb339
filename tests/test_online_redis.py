"""The Redis side of the online system against a real Redis: the quarantine (dedup, cap,
claim / archive / release, idempotent replay), repair records (exactly one in flight under a
race, reconciliation of a lost job) and the spool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from nnoculation.online.keys import Keys
from nnoculation.online.processes import live_processes, report_process
from nnoculation.online.quarantine import (
    ADDED,
    DUPLICATE,
    FULL,
    REPLAYED,
    Quarantine,
    QuarantineEntry,
)
from nnoculation.online.repairs import (
    FAILED,
    PUBLISHED,
    QUEUED,
    RUNNING,
    Repairs,
    job_id,
)
from service.spool import Spool, read_records
from tests.online import DEFAULT_REDIS_URL, new_prefix


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(DEFAULT_REDIS_URL)
    c.ping()
    yield c
    c.close()


@pytest.fixture
def keys(client: redis.Redis) -> Iterator[Keys]:
    k = Keys(new_prefix(), "dep")
    yield k
    for key in client.scan_iter(f"{k.prefix}:*"):
        client.delete(key)
    client.delete(f"rq:queue:{k.queue}")


def entry(value: int, version: str = "v0001", bad: int = 1) -> QuarantineEntry:
    return QuarantineEntry(torch.full((1, 4, 4), value, dtype=torch.uint8), bad, 0, version,
                           time.time())  # fmt: skip


def test_add_counts_duplicates_once_and_keeps_the_image(client: redis.Redis, keys: Keys) -> None:
    q = Quarantine(client, keys, cap=100)
    assert q.add(entry(1)).status == ADDED
    assert q.add(entry(1)).status == DUPLICATE
    result = q.add(entry(2, bad=3))
    assert result.status == ADDED and result.pending == 2
    stats = q.stats()
    assert stats["size"] == 2 and stats["events"] == 3
    assert stats["versions"]["v0001"] == {"pending": 2, "badnet_labels": {1: 1, 3: 1}}
    items = {i.sha256: i for i in q.samples("v0001", 10)}
    first = items[entry(1).sha256]
    assert first.count == 2 and torch.equal(first.image, entry(1).image)


def test_the_cap_refuses_loudly_and_repairs_make_room(client: redis.Redis, keys: Keys) -> None:
    q = Quarantine(client, keys, cap=3)
    for v in range(3):
        assert q.add(entry(v)).status == ADDED
    assert q.add(entry(9)).status == FULL
    assert q.stats()["overflow"] == 1
    assert q.claim("v0001", "r1") == 3
    assert q.add(entry(9)).status == FULL  # claimed entries still count against the cap
    assert q.archive("r1") == 3
    assert q.add(entry(9)).status == ADDED
    assert len(q.archived("r1")) == 3  # archived, not deleted


def test_claim_archive_release_are_idempotent(client: redis.Redis, keys: Keys) -> None:
    q = Quarantine(client, keys, cap=100)
    for v in range(4):
        q.add(entry(v))
    assert q.claim("v0001", "r1") == 4
    q.add(entry(10))  # arrives during the repair: a fresh pending set
    assert q.claim("v0001", "r1") == 4  # a retried job finds the same claim
    assert q.claimed_images("r1").shape == (4, 1, 4, 4)
    assert q.pending_count("v0001") == 1
    assert q.release("r1") == 4  # the repair crashed: back to pending
    assert q.release("r1") == 0
    assert q.pending_count("v0001") == 5
    assert q.stats()["versions"]["v0001"]["badnet_labels"] == {1: 5}
    assert q.claim("v0001", "r2") == 5
    assert q.archive("r2") == 5 and q.archive("r2") == 0
    assert q.claim("v0001", "r2") == -1  # an archived repair cannot claim again
    assert q.stats()["size"] == 0


def test_replayed_events_apply_once(client: redis.Redis, keys: Keys) -> None:
    q = Quarantine(client, keys, cap=100)
    assert q.add(entry(5), event_id="e1").status == ADDED
    assert q.add(entry(5), event_id="e1").status == REPLAYED
    assert q.add(entry(5), event_id="e2").status == DUPLICATE
    assert q.samples("v0001", 10)[0].count == 2


def test_only_one_repair_starts_when_many_race(client: redis.Redis, keys: Keys) -> None:
    repairs = Repairs(client, keys, job_timeout_s=600)
    results = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(repairs.start("v0001", "auto", 200))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if r.started]
    assert len(started) == 1
    assert {r.repair_id for r in results} == {started[0].repair_id}
    assert repairs.queue_depth() == 1
    record = repairs.get(started[0].repair_id)
    assert record is not None and record["status"] == QUEUED and record["job_id"]


def test_reconcile_re_enqueues_a_repair_whose_job_died(client: redis.Redis, keys: Keys) -> None:
    repairs = Repairs(client, keys, job_timeout_s=600)
    rid = repairs.start("v0001", "admin", 5).repair_id
    repairs.queue.empty()  # the job is lost (a worker died holding it)
    repairs.update(rid, status=RUNNING, updated=repr(time.time() - 60))
    client.hset(keys.repair(rid), "updated", repr(time.time() - 60))
    actions = repairs.reconcile(lambda: "v0001", lambda v: 0, n=200)
    assert actions == [f"re-enqueued repair {rid} as attempt 2"]
    assert repairs.get(rid)["attempt"] == 2  # type: ignore[index]
    assert repairs.queue.job_ids == [job_id(rid, 2)]
    # Running with no job in the queue (RQ moved it to its started registry): a live
    # heartbeat means somebody works on it, so nothing to do; once the beat expires, it stalled.
    repairs.queue.empty()
    repairs.update(rid, status=RUNNING)
    repairs.beat(rid, 10, "test")
    client.hset(keys.repair(rid), "updated", repr(time.time() - 60))
    assert repairs.reconcile(lambda: "v0001", lambda v: 0, n=200) == []
    client.delete(keys.repair_heartbeat(rid))
    actions = repairs.reconcile(lambda: "v0001", lambda v: 0, n=200)
    assert actions == [f"re-enqueued repair {rid} as attempt 3"]


def test_reconcile_starts_a_due_repair_and_releases_ended_locks(
    client: redis.Redis, keys: Keys
) -> None:
    repairs = Repairs(client, keys, job_timeout_s=600)
    actions = repairs.reconcile(lambda: "v0003", lambda v: 250 if v == "v0003" else 0, n=200)
    assert len(actions) == 1 and actions[0].startswith("started repair")
    rid = repairs.current()
    assert rid is not None
    client.hset(keys.repair(rid), "status", FAILED)  # ended without releasing (a crash)
    actions = repairs.reconcile(lambda: "v0003", lambda v: 0, n=200)
    assert actions == [f"released the lock of ended repair {rid}"] and repairs.current() is None


def test_finish_releases_the_lock_and_can_back_off(client: redis.Redis, keys: Keys) -> None:
    repairs = Repairs(client, keys, job_timeout_s=600)
    rid = repairs.start("v0001", "auto", 200).repair_id
    repairs.finish(rid, FAILED, backoff_s=30, reason="boom")
    assert repairs.current() is None and repairs.in_backoff()
    assert repairs.get(rid)["reason"] == "boom"  # type: ignore[index]
    assert repairs.reconcile(lambda: "v0001", lambda v: 500, n=200) == []  # backing off


def test_a_repair_record_reads_back_the_types_it_was_given(client: redis.Redis, keys: Keys) -> None:
    """What /admin/repairs serves: a bool stays a bool ("False" is truthy to a script), the
    measures stay numbers, a blanked epoch is null, and a missing measure stays missing."""
    repairs = Repairs(client, keys, job_timeout_s=600)
    rid = repairs.start("v0001", "auto", 200).repair_id
    repairs.update(rid, stage="cyclegan", epoch=3, epochs=10)
    repairs.update(rid, stage="finetune", epoch="")  # a new stage blanks the last one's epoch
    repairs.finish(rid, PUBLISHED, activated=False, trigger_effect=0.25, relapse=0.0,
                   relapse_missing=None, holdout={"baseline": 0.9})  # fmt: skip
    record = repairs.get(rid)
    assert record is not None
    assert record["activated"] is False and record["attempt"] == 1 and record["epochs"] == 10
    assert record["epoch"] is None and record["pending_at_start"] == 200
    assert record["trigger_effect"] == 0.25 and record["relapse"] == 0.0
    assert isinstance(record["relapse"], float) and "relapse_missing" not in record
    assert record["holdout"] == {"baseline": 0.9} and isinstance(record["finished"], float)


def test_process_records_read_back_numbers_and_nulls(client: redis.Redis, keys: Keys) -> None:
    """/admin/status lists every process as its own ``this_process`` describes itself: a pid
    that compares equal, null (not "") before the first swap; an older release's plain-string
    record still reads."""
    report_process(client, keys, "host:1", {"pid": 1, "version": "v0001", "started": 12.5,
                                             "swapped_at": None, "swap_error": None,
                                             "rss_bytes": 4096}, ttl_s=30)  # fmt: skip
    client.hset(keys.process("host:2"), mapping={"pid": "2", "version": "v0001"})
    client.zadd(keys.processes, {"host:2": time.time()})
    first, legacy = live_processes(client, keys)
    assert first == {"member": "host:1", "pid": 1, "version": "v0001", "started": 12.5,
                     "swapped_at": None, "swap_error": None, "rss_bytes": 4096}  # fmt: skip
    assert legacy["version"] == "v0001" and legacy["pid"] == 2


def test_spool_survives_a_torn_tail_and_replays_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [entry(v).to_record() for v in range(3)]
    for record in records:
        spool.append(record)
    path = spool.files()[0]
    with path.open("ab") as handle:
        handle.write(b"\x00\x00\x10\x00garbage")  # a crash in the middle of a write
    assert [r["sha256"] for r in read_records(path)] == [r["sha256"] for r in records]
    applied: list[str] = []
    failing = {"on": True}

    def apply(record: dict) -> None:  # type: ignore[type-arg]
        if failing["on"] and len(applied) == 1:
            raise redis.ConnectionError("down again")
        applied.append(record["event_id"])

    with pytest.raises(redis.ConnectionError):
        spool.replay(apply)
    assert spool.files() == [path]  # nothing is deleted until every record went through
    failing["on"] = False
    assert spool.replay(apply) == 3
    assert spool.files() == []
    assert applied[0] == applied[1]  # the first record was sent again: hence event ids
    restored = QuarantineEntry.from_record(records[2])
    assert torch.equal(restored.image, entry(2).image)


def test_an_orphaned_spool_is_replayed_by_another_process(tmp_path: Path) -> None:
    dead = Spool(tmp_path)
    dead.append(entry(1).to_record())
    alive_owner = Spool(tmp_path)
    alive_owner.append(entry(2).to_record())
    dead.close()  # its process died: the lock is gone
    third = Spool(tmp_path)
    seen: list[str] = []
    # alive_owner still holds its lock; third may only take the orphan.
    assert third.replay(lambda r: seen.append(r["sha256"])) == 1
    assert seen == [entry(1).sha256]
    assert len(third.files()) == 1
