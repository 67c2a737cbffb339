"""End to end on one machine, as in production: a private Redis with AOF, ``nnoculation
serve`` with 2 uvicorn workers, ``nnoculation worker`` (RQ), a tiny deployment and a tiny
CycleGAN profile. Poisoned traffic fills the quarantine to N, exactly one repair job runs,
the repaired version is published, activated and served by every API process, and no request
fails while it is swapped in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis
import rq

from models.store import ModelStore
from nnoculation.benchmarks.processes import redis_server, wait_until
from nnoculation.online.keys import Keys
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

N = 12
PNG = PNG_HEADERS
# The gate is loosened: this test is about the machinery, not the tiny nets' accuracy.
REPAIR_OPTIONS = '{"theta": 0.9, "finetune_epochs": 1, "domain_a_size": 64}'


def test_quarantine_fills_one_repair_runs_every_process_swaps(
    tmp_path: Path, tiny_deployment: Any
) -> None:
    source, attack, _ = tiny_deployment
    store_root = tmp_path / "store"
    publish(store_root, source)
    with redis_server(tmp_path / "redis") as server:
        prefix = new_prefix()
        env = online_env(store_root, server.url, prefix, tmp_path, quarantine_n=N,
                         repair_options=REPAIR_OPTIONS)  # fmt: skip
        api = ApiServer(env, tmp_path / "api.log", workers=2)
        worker = WorkerProcess(env, tmp_path / "worker.log")
        traffic = Load(api.url, clean_pngs(16, seed=40))
        try:
            api.wait_ready()
            admin = api.admin()
            wait_until(lambda: len(admin.get("/admin/status").json()["processes"]) == 2, 20,
                     "both API processes to report")  # fmt: skip
            traffic.start()
            # Poisoned inputs until the quarantine holds N (distinct) disagreements.
            for data in poisoned_pngs(attack, 120, seed=41):
                assert api.client().post("/predict", content=data, headers=PNG).status_code == 200
                if admin.get("/admin/repairs").json()["repairs"]:
                    break
            repairs = wait_until(lambda: admin.get("/admin/repairs").json()["repairs"], 10,
                               "a repair to start")  # fmt: skip
            rid = repairs[0]["id"]
            assert repairs[0]["trigger"] == "auto" and repairs[0]["pending_at_start"] >= N
            # More poisoned inputs while it runs must not start a second repair.
            for data in poisoned_pngs(attack, 30, seed=42):
                api.client().post("/predict", content=data, headers=PNG)
            record = wait_until(
                lambda: (r := admin.get(f"/admin/repairs/{rid}").json())["status"]
                in ("published", "gated", "failed") and r,
                180, "the repair to end", interval_s=0.5,
            )  # fmt: skip
            assert record["status"] == "published", (record, worker.output()[-3000:])
            new = record["result_version"]
            announced = float(record["announced"])

            def converged() -> list[dict[str, str]] | None:
                procs = admin.get("/admin/status").json()["processes"]
                return procs if len(procs) == 2 and all(p["version"] == new for p in procs) \
                    else None  # fmt: skip

            procs = wait_until(converged, 10, "every API process to serve the new version")
            lags = [float(p["swapped_at"]) - announced for p in procs]
            assert max(lags) <= 5.0, lags
            time.sleep(1.0)  # traffic on the new version
        finally:
            traffic.finish()
            api.stop()
            worker.stop()

        statuses = {status for status, _, _ in traffic.results}
        assert traffic.errors == [] and statuses == {200}, (traffic.errors[:5], statuses)
        assert {"v0001", new} <= {body["model_version"] for _, body, _ in traffic.results if body}
        store = ModelStore(store_root)
        assert store.versions(DEPLOYMENT) == ["v0001", new] and store.active(DEPLOYMENT) == new
        assert store.manifest(DEPLOYMENT, new).parent == "v0001"
        client = redis.Redis.from_url(server.url)
        keys = Keys(prefix, DEPLOYMENT)
        assert client.zcard(keys.repairs) == 1  # exactly one repair record ...
        queue = rq.Queue(keys.queue, connection=client)
        finished = rq.registry.FinishedJobRegistry(queue=queue).get_job_ids()
        failed = rq.registry.FailedJobRegistry(queue=queue).get_job_ids()
        assert finished == [f"{rid}-a1"] and failed == []  # ... and exactly one job ran
        archived = client.zcard(keys.archive(rid))
        assert archived == int(record["entries"]) >= N  # consumed entries kept, not deleted
