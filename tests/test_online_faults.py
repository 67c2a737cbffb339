"""Faults a production deployment meets, with real processes: Redis killed and restarted under
traffic, the worker killed mid-repair, a tampered bundle announced, and 20 swaps in a row under
load."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import redis

from models.store import ModelStore
from nnoculation.benchmarks.processes import redis_server, wait_until
from nnoculation.inputs import decode_image
from nnoculation.online.announce import announce_activation
from nnoculation.online.keys import Keys
from nnoculation.online.quarantine import content_hash
from tests.online import (
    DEPLOYMENT,
    PNG_HEADERS,
    ApiServer,
    Load,
    WorkerProcess,
    clean_pngs,
    new_prefix,
    online_env,
    poisoned_pngs,
    publish,
)

PNG = PNG_HEADERS


def test_redis_restart_under_traffic_loses_and_doubles_nothing(
    tmp_path: Path, tiny_deployment: Any
) -> None:
    source, attack, _ = tiny_deployment
    publish(tmp_path / "store", source)
    poisoned = poisoned_pngs(attack, 80, seed=51)  # each sent once: every entry is distinct
    with redis_server(tmp_path / "redis") as server:
        prefix = new_prefix()
        env = online_env(tmp_path / "store", server.url, prefix, tmp_path,
                         quarantine_n=100_000)  # fmt: skip
        api = ApiServer(env, tmp_path / "api.log")
        load = Load(api.url, poisoned, admin_token="test-admin-token")
        try:
            api.wait_ready()
            spec = ModelStore(tmp_path / "store").load(DEPLOYMENT).spec
            load.start()
            wait_until(lambda: len(load.results) >= 15, 20, "traffic before the outage")
            os.kill(server.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            server.process.wait()  # type: ignore[union-attr]
            during = len(load.results)
            wait_until(lambda: len(load.results) >= during + 25, 30, "traffic during the outage")
            spooled = list((tmp_path / "spool").glob("*.spool"))
            assert spooled, "quarantine entries must go to the spool while Redis is down"
            server.start()  # same port, same AOF directory
            wait_until(lambda: len(load.results) >= 80, 30, "traffic after the restart")
        finally:
            load.finish()
        client = redis.Redis.from_url(server.url)
        keys = Keys(prefix, DEPLOYMENT)
        try:
            assert load.errors == [] and {s for s, _, _ in load.results} == {200}
            sent = {}  # sha of each quarantined input -> times it was answered
            for _, body, data in load.results:
                assert body is not None
                if body["quarantined"]:
                    sha = content_hash(decode_image(data, spec))
                    sent[sha] = sent.get(sha, 0) + 1
            assert len(sent) >= 40

            def arrived() -> bool:
                # The spool files go only after every record in them is in Redis; the distinct
                # entries alone arrive before the repeats of an input are all counted.
                replayed = not list((tmp_path / "spool").glob("*.spool"))
                return replayed and client.zcard(keys.pending("v0001")) == len(sent)

            wait_until(arrived, 30, "every spooled entry to be replayed")
            stored = {
                sha.decode(): int(client.hget(keys.item(sha.decode()), "count"))
                for sha in client.zrange(keys.pending("v0001"), 0, -1)
            }
            assert stored == sent  # none lost, none doubled, duplicates counted exactly
        finally:
            api.stop()
            client.close()


def test_worker_killed_mid_repair_resumes_after_reconciliation(
    tmp_path: Path, tiny_deployment: Any
) -> None:
    source, attack, _ = tiny_deployment
    store_root = tmp_path / "store"
    publish(store_root, source)
    store = ModelStore(store_root)
    with redis_server(tmp_path / "redis") as server:
        env = online_env(
            store_root, server.url, new_prefix(), tmp_path, quarantine_n=10,
            repair_options='{"theta": 0.9, "finetune_epochs": 1, "domain_a_size": 64, '
            '"cyclegan_epochs": 60}',
        )  # fmt: skip
        api = ApiServer(env, tmp_path / "api.log")
        worker = WorkerProcess(env, tmp_path / "worker1.log")
        second: WorkerProcess | None = None
        try:
            api.wait_ready()
            admin = api.admin()
            for data in poisoned_pngs(attack, 60, seed=52):
                api.client().post("/predict", content=data, headers=PNG)
                if admin.get("/admin/repairs").json()["repairs"]:
                    break
            rid = wait_until(lambda: admin.get("/admin/repairs").json()["repairs"], 10,
                           "a repair")[0]["id"]  # fmt: skip

            def cyclegan_running() -> dict[str, Any] | None:
                record = admin.get(f"/admin/repairs/{rid}").json()
                return record if record.get("stage") == "trigger_model" and \
                    int(record.get("epoch") or 0) >= 5 else None  # fmt: skip

            record = wait_until(cyclegan_running, 60, "the CycleGAN to train a few epochs")
            holder = redis.Redis.from_url(server.url).get(
                Keys(env["NNOC_KEY_PREFIX"], DEPLOYMENT).repair_heartbeat(rid)
            )
            horse = int(holder.decode().rsplit(":", 1)[1])  # type: ignore[union-attr]
            worker.kill(signal.SIGKILL)  # the worker process group ...
            with contextlib.suppress(ProcessLookupError):
                os.kill(horse, signal.SIGKILL)  # ... and the work horse (its own session)
            wait_until(lambda: not running(horse), 10, "the work horse to die")
            killed_at = time.monotonic()
            assert store.versions(DEPLOYMENT) == ["v0001"]
            assert store.active(DEPLOYMENT) == "v0001"
            assert not [p for p in (store_root / DEPLOYMENT).iterdir()
                        if p.name.startswith(".tmp-")]  # fmt: skip
            assert (
                api.client()
                .post("/predict", content=clean_pngs(1, 3)[0], headers=PNG)
                .json()["model_version"]
                == "v0001"
            )

            second = WorkerProcess(env, tmp_path / "worker2.log")

            def ended() -> dict[str, Any] | None:
                r = admin.get(f"/admin/repairs/{rid}").json()
                return r if r["status"] in ("published", "gated", "failed") else None

            final = wait_until(ended, 120, "the repair to complete after reconciliation", 0.5)
            assert final["status"] == "published", (final, second.output()[-3000:])
            assert final["attempt"] == 2
            resumed = store.manifest(DEPLOYMENT, final["result_version"]).provenance["repairs"][-1][
                "trigger_model"
            ]["resumed_from_epoch"]
            assert resumed is not None and resumed >= int(record["epoch"])
            assert store.versions(DEPLOYMENT) == ["v0001", "v0002"]
            assert store.active(DEPLOYMENT) == "v0002"
            # Heartbeat TTL 3 s + reconcile interval 1 s (+ start-up): well within 60 s.
            assert time.monotonic() - killed_at < 60
        finally:
            api.stop()
            worker.kill()
            if second is not None:
                second.stop()


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_tampered_bundle_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, tiny_deployment: Any
) -> None:
    source, _, _ = tiny_deployment
    store_root = tmp_path / "store"
    publish(store_root, source)
    bad = publish(store_root, source)  # v0002, then changed on the shared volume
    store = ModelStore(store_root)
    store.activate(DEPLOYMENT, "v0001")
    env = online_env(store_root, "redis://127.0.0.1:6379/0", new_prefix(), tmp_path)
    api = ApiServer(env, tmp_path / "api.log")
    try:
        api.wait_ready()
        tamper(store.path(DEPLOYMENT, bad) / "goodnet.safetensors")
        # An attacker (or a broken copy) points ACTIVE at it without going through activate().
        (store_root / DEPLOYMENT / "ACTIVE").write_text(bad + "\n")
        client = redis.Redis.from_url(env["NNOC_REDIS_URL"])
        announce_activation(client, Keys(env["NNOC_KEY_PREFIX"], DEPLOYMENT), bad, "test")
        admin = api.admin()
        status = wait_until(
            lambda: (s := admin.get("/admin/status").json())["this_process"]["swap_error"] and s,
            10, "the swap to be refused",
        )  # fmt: skip
        assert "sha256" in status["this_process"]["swap_error"]
        answer = api.client().post("/predict", content=clean_pngs(1, 5)[0], headers=PNG)
        assert answer.status_code == 200 and answer.json()["model_version"] == "v0001"
        assert 'nnoc_swaps_total{result="refused"}' in api.client().get("/metrics").text
        refused = admin.post(f"/admin/versions/{bad}/activate")
        assert refused.status_code == 422 and "sha256" in refused.json()["detail"]
        # Without an announcement, polling the store's pointer finds a newly activated version.
        good = publish(store_root, source)
        store.activate(DEPLOYMENT, good)
        wait_until(
            lambda: admin.get("/admin/status").json()["this_process"]["version"] == good,
            5, "polling to pick up an activation nobody announced",
        )  # fmt: skip
    finally:
        api.stop()


def test_twenty_swaps_under_load_fail_no_request_and_leak_no_memory(
    tmp_path: Path, tiny_deployment: Any
) -> None:
    source, _, _ = tiny_deployment
    store_root = tmp_path / "store"
    versions = [publish(store_root, source) for _ in range(21)]
    store = ModelStore(store_root)
    store.activate(DEPLOYMENT, versions[0])
    env = online_env(store_root, "redis://127.0.0.1:6379/0", new_prefix(), tmp_path)
    api = ApiServer(env, tmp_path / "api.log", workers=2)
    loads = [Load(api.url, clean_pngs(8, seed=60 + i)) for i in range(3)]
    rss: list[int] = []
    try:
        api.wait_ready()
        admin = api.admin()
        for load in loads:
            load.start()
        for version in versions[1:]:
            assert admin.post(f"/admin/versions/{version}/activate").status_code == 200

            def served(v: str = version) -> list[dict[str, str]] | None:
                procs = admin.get("/admin/status").json()["processes"]
                return procs if len(procs) == 2 and all(p["version"] == v for p in procs) \
                    else None  # fmt: skip

            procs = wait_until(served, 15, f"every process to serve {version}")
            rss.append(sum(int(p["rss_bytes"]) for p in procs))
        time.sleep(0.5)
    finally:
        for load in loads:
            load.finish()
        api.stop()
    results = [r for load in loads for r in load.results]
    assert all(not load.errors for load in loads), [load.errors[:3] for load in loads]
    assert {status for status, _, _ in results} == {200}
    answered = {body["model_version"] for _, body, _ in results if body}
    assert len(answered) >= 10  # the load really ran across the swaps
    assert len(rss) == 20
    growth = rss[-1] / rss[0] - 1
    assert growth <= 0.10, f"memory after 20 swaps is {growth:.1%} above after the first: {rss}"
