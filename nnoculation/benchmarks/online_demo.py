"""The online scenario end to end (``make demo``): a patch BadNet on Fashion-MNIST is deployed
behind ``nnoculation serve`` (2 uvicorn workers) with ``nnoculation worker`` beside it; a client
sends the stream pool over HTTP at a fixed rate with 20 % of the inputs poisoned; the repair
fires by itself at N = 200 and the repaired version is swapped in under traffic.

CA and ASR before and after are measured through the HTTP API on the test pool (admin calls
with ``X-NNOC-Evaluation``, so the measurement never feeds the quarantine), each ASR beside the
floor of the clean model trained the same way. Writes ``demo.json`` and ``demo.md``.

    python -m nnoculation.benchmarks.online_demo --out docs/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from models.store import ModelStore
from nnoculation.attacks import AttackSpec
from nnoculation.badnets import load_splits
from nnoculation.benchmarks.common import RUNS_DIR, commit, machine
from nnoculation.benchmarks.processes import api_server, redis_url_for, worker_process
from nnoculation.benchmarks.repair import deployment_for
from nnoculation.data.imageset import ImageSet
from nnoculation.inputs import encode_png
from nnoculation.metrics import EVAL_SEED
from nnoculation.online.quarantine import content_hash
from nnoculation.recipes import FASHION_MNIST_RECIPE
from nnoculation.stream import StreamConfig, make_stream

DEPLOYMENT = "fashion"
BATCH = 64  # images per /predict/batch call when measuring
TARGET_SLACK = 2.0  # after repair, ASR within floor + 2 points (issue 9, as offline)
PNG = {"content-type": "image/png"}


def pct(x: float) -> float:
    return round(100 * x, 2)


# --- measuring through the API ---


async def labels_via_api(client: httpx.AsyncClient, images: torch.Tensor) -> list[int]:
    """The API's answers for uint8 images, 64 per /predict/batch, as measurement traffic."""
    out: list[int] = []
    for start in range(0, len(images), BATCH):
        files = [("files", (f"{i}.png", encode_png(img)))
                 for i, img in enumerate(images[start:start + BATCH])]  # fmt: skip
        r = await client.post("/predict/batch", files=files,
                              headers={"X-NNOC-Evaluation": "true"})  # fmt: skip
        r.raise_for_status()
        for item in r.json()["results"]:
            if item["status"] != 200:
                raise RuntimeError(f"measurement item failed: {item}")
            out.append(item["prediction"]["label"])
    return out


async def measure(
    client: httpx.AsyncClient, test: ImageSet, attack: AttackSpec, floor: dict[str, float]
) -> dict[str, Any]:
    """CA on the test pool and ASR of each trigger (over images whose label is not the
    target), with the API as the model."""
    labels = torch.tensor(await labels_via_api(client, test.images))
    ca = float((labels == test.labels).float().mean())
    asr = {}
    for trigger in attack.triggers:
        images, targets, keep = attack.triggered(test, trigger, EVAL_SEED)
        answers = torch.tensor(await labels_via_api(client, images[keep]))
        asr[trigger.name] = float((answers == targets[keep]).float().mean())
    one = len(asr) == 1
    return {
        "ca": pct(ca),
        "asr": pct(next(iter(asr.values()))) if one else [pct(v) for v in asr.values()],
        "floor": pct(floor[next(iter(asr))]) if one else [pct(floor[k]) for k in asr],
    }


# --- the stream ---


@dataclass
class Sent:
    t: float
    poisoned: bool
    status: int = 0
    version: str | None = None
    error: str | None = None


@dataclass
class Timeline:
    """What the watcher saw, in wall time."""

    repair_id: str | None = None
    repair_created: float | None = None
    record: dict[str, Any] = field(default_factory=dict)
    swapped: dict[str, float] = field(default_factory=dict)  # member -> swapped_at
    converged_at: float | None = None


async def send_stream(
    client: httpx.AsyncClient,
    pngs: list[bytes],
    poisoned: list[bool],
    rate: float,
    sent: list[Sent],
    stop: asyncio.Event,
    max_in_flight: int,
) -> None:
    """Open-loop load: one request every 1/rate s (the stream cycles), at most
    ``max_in_flight`` outstanding."""
    gate = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        record = Sent(time.time(), poisoned[i])
        sent.append(record)
        try:
            r = await client.post("/predict", content=pngs[i], headers=PNG)
            record.status = r.status_code
            if r.status_code == 200:
                record.version = r.json()["model_version"]
        except httpx.HTTPError as err:
            record.error = repr(err)
        finally:
            gate.release()

    start, k = time.perf_counter(), 0
    while not stop.is_set():
        await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
        await gate.acquire()
        task = asyncio.create_task(one(k % len(pngs)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
    await asyncio.gather(*tasks)


async def watch(
    admin: httpx.AsyncClient, timeline: Timeline, stop: asyncio.Event, after_s: float,
    workers: int, log: Any,
) -> None:  # fmt: skip
    """Poll the admin API: the repair's start and end, then every process's swap; stop the
    stream ``after_s`` seconds after all processes serve the repaired version."""
    last_stage = None
    while not stop.is_set():
        await asyncio.sleep(0.5)
        repairs = (await admin.get("/admin/repairs")).json()["repairs"]
        if repairs and timeline.repair_id is None:
            timeline.repair_id = repairs[-1]["id"]
            timeline.repair_created = repairs[-1]["created"]
            log(f"repair {timeline.repair_id} started by itself at N")
        if timeline.repair_id is None:
            continue
        record = (await admin.get(f"/admin/repairs/{timeline.repair_id}")).json()
        stage = (record.get("stage"), record.get("epoch"))
        if stage != last_stage and record.get("epoch"):
            log(f"  {record['stage']} epoch {record['epoch']}/{record.get('epochs')}")
        last_stage = stage
        if record["status"] in ("gated", "failed", "cancelled"):
            timeline.record = record
            log(f"repair ended: {record['status']} ({record.get('reason')})")
            stop.set()
            return
        if record["status"] != "published":
            continue
        timeline.record = record
        new = record["result_version"]
        procs = (await admin.get("/admin/status")).json()["processes"]
        serving = [p for p in procs if p["version"] == new]
        if len(serving) == workers and timeline.converged_at is None:
            timeline.swapped = {p["member"]: float(p["swapped_at"]) for p in serving}
            timeline.converged_at = time.time()
            log(f"every API process serves {new}; {after_s:.0f} s more traffic")
        if timeline.converged_at and time.time() - timeline.converged_at >= after_s:
            stop.set()


# --- the run ---


def prepare_store(root: Path, deployment_dir: Path) -> str:
    if root.exists():
        shutil.rmtree(root)
    return ModelStore(root).import_bundle(DEPLOYMENT, deployment_dir, activate=True)


def environment(
    store: Path, redis_url: str, work: Path, args: argparse.Namespace
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNOC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "NNOC_REDIS_URL": redis_url,
            "NNOC_KEY_PREFIX": f"demo{secrets.token_hex(4)}",
            "NNOC_DEPLOYMENT": DEPLOYMENT,
            "NNOC_STORE_ROOT": str(store),
            "NNOC_SPOOL_DIR": str(work / "spool"),
            "NNOC_WORK_DIR": str(work / "repairs"),
            "NNOC_ADMIN_TOKEN": args.admin_token,
            "NNOC_QUARANTINE_N": str(args.n),
            "NNOC_REPAIR_PROFILE": args.profile,
            "NNOC_METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def ab(figures: dict[str, Any]) -> str:
    return f"CA {figures['ca']} %, ASR {figures['asr']} % (floor {figures['floor']} %)"


async def scenario(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    recipe = FASHION_MNIST_RECIPE
    splits = load_splits(recipe)
    log("deployment: patch BadNet + pre-deployment GoodNet (made once, then cached)")
    bundle, attack, floor = deployment_for(args.attack, recipe, splits, Path(args.runs))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    log(f"store {store}: {DEPLOYMENT} {prepare_store(store, bundle.path)} active")
    config = StreamConfig(poison_ratio=args.poison_ratio, seed=args.seed)
    images, flags = make_stream(splits.stream, attack, config)
    pngs = [encode_png(img) for img in images]
    poisoned = flags.tolist()
    poisoned_shas = {content_hash(img) for img, f in zip(images, poisoned, strict=True) if f}
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_url_for(args.redis_url, work / "redis"))
        env = environment(store, redis_url, work, args)
        url = stack.enter_context(
            api_server({**env, "NNOC_WORKERS": str(args.workers)}, work / "api.log", args.workers)
        )
        stack.enter_context(worker_process({**env, "NNOC_THREADS": str(args.worker_threads)},
                                           work / "worker.log"))  # fmt: skip
        log(f"API at {url} ({args.workers} uvicorn workers), worker running; Redis {redis_url}")
        auth = {"Authorization": f"Bearer {args.admin_token}"}
        limits = httpx.Limits(max_connections=args.max_in_flight + 8)
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=auth) as admin:
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                log("measuring before (test pool through the API)...")
                before = await measure(admin, splits.test, attack, floor)
                log(f"  before: {ab(before)}")
                sent: list[Sent] = []
                timeline = Timeline()
                stop = asyncio.Event()
                log(f"stream: {len(pngs)} inputs, {args.poison_ratio:.0%} poisoned, "
                    f"{args.rate:.0f}/s")  # fmt: skip
                deadline = asyncio.get_running_loop().call_later(args.timeout, stop.set)
                await asyncio.gather(
                    send_stream(client, pngs, poisoned, args.rate, sent, stop, args.max_in_flight),
                    watch(admin, timeline, stop, args.after, args.workers, log),
                )
                deadline.cancel()
            if timeline.record.get("status") != "published":
                raise RuntimeError(f"no repaired version was served: {timeline.record}")
            log("measuring after...")
            after = await measure(admin, splits.test, attack, floor)
            log(f"  after: {ab(after)}")
            archive = await admin.get(
                f"/admin/quarantine/archives/{timeline.repair_id}", params={"limit": 10000}
            )
    return summarise(args, before, after, sent, timeline, archive.json()["items"], poisoned_shas)


def summarise(
    args: argparse.Namespace, before: dict[str, Any], after: dict[str, Any], sent: list[Sent],
    timeline: Timeline, archive: list[dict[str, Any]], poisoned_shas: set[str],
) -> dict[str, Any]:  # fmt: skip
    record = timeline.record
    created = float(timeline.repair_created or 0)
    announced = float(record["announced"])
    served_all = max(timeline.swapped.values())
    first_poisoned = min(s.t for s in sent if s.poisoned)
    quarantined = {item["sha256"] for item in archive}
    failed = [s for s in sent if s.status != 200]
    stream_seconds = sent[-1].t - sent[0].t
    after_asr = after["asr"] if isinstance(after["asr"], list) else [after["asr"]]
    floors = after["floor"] if isinstance(after["floor"], list) else [after["floor"]]
    return {
        "before": before,
        "after": after,
        "quarantine_precision": round(len(quarantined & poisoned_shas) / len(quarantined), 4),
        "quarantine_size": len(quarantined),
        "requests_until_repair": sum(1 for s in sent if s.t <= created),
        "repair_seconds": round(float(record["finished"]) - created, 1),
        "repair_stage_seconds": {k: round(v, 1) for k, v in record.get("seconds", {}).items()},
        "swap_seconds": round(served_all - announced, 2),
        "seconds_to_immunity": round(served_all - first_poisoned, 1),
        "request_rate": round(len(sent) / stream_seconds, 1),
        "requests_sent": len(sent),
        "failed_requests": len(failed),
        "versions": {"before": "v0001", "after": record["result_version"]},
        "target_met": all(a <= f + TARGET_SLACK for a, f in zip(after_asr, floors, strict=True)),
        "settings": {
            "attack": args.attack,
            "n": args.n,
            "poison_ratio": args.poison_ratio,
            "rate": args.rate,
            "api_workers": args.workers,
            "worker_threads": args.worker_threads,
            "profile": args.profile,
            "seed": args.seed,
        },
    }


def markdown(doc: dict[str, Any]) -> str:
    r = doc["result"]
    b, a = r["before"], r["after"]
    s = r["settings"]
    lines = [
        "# Online demo: the whole scenario through HTTP",
        "",
        f"A {s['attack']} BadNet on Fashion-MNIST behind `nnoculation serve` "
        f"({s['api_workers']} uvicorn workers) and `nnoculation worker`; a client sent the stream "
        f"pool at {r['request_rate']} requests/s with {s['poison_ratio']:.0%} poisoned inputs. The "
        f"repair fired by itself at N = {s['n']} (profile `{s['profile']}`) and was swapped in "
        "under traffic. CA / ASR in % on the test pool, measured through the API.",
        "",
        "| | CA | ASR | floor | version |",
        "|---|---|---|---|---|",
        f"| before | {b['ca']} | {b['asr']} | {b['floor']} | {r['versions']['before']} |",
        f"| after | {a['ca']} | {a['asr']} | {a['floor']} | {r['versions']['after']} |",
        "",
        f"Target (ASR within floor + {TARGET_SLACK:.0f} points after repair): "
        f"**{'met' if r['target_met'] else 'missed'}**.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| quarantine precision (share of the consumed quarantine that was poisoned) | "
        f"{r['quarantine_precision']:.1%} of {r['quarantine_size']} |",
        f"| requests until the repair started | {r['requests_until_repair']} |",
        f"| repair seconds (enqueued to published) | {r['repair_seconds']} |",
        f"| swap seconds (announcement to every process serving it) | {r['swap_seconds']} |",
        f"| seconds to immunity (first poisoned request to every process repaired) | "
        f"{r['seconds_to_immunity']} at {r['request_rate']} requests/s |",
        f"| failed requests | {r['failed_requests']} of {r['requests_sent']} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default=str(RUNS_DIR), help="cache of BadNets and deployments")
    parser.add_argument("--work", default="runs/demo", help="store, logs and Redis data")
    parser.add_argument("--attack", default="patch")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--poison-ratio", type=float, default=0.2)
    parser.add_argument("--rate", type=float, default=50.0, help="stream requests per second")
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of a repair")
    parser.add_argument("--profile", default="cpu", help="repair profile")
    parser.add_argument("--after", type=float, default=10.0, help="traffic after the swap (s)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="use this Redis (default: $REDIS_URL, else a private redis-server)",
    )
    parser.add_argument("--admin-token", default=secrets.token_hex(16))
    args = parser.parse_args()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    result = asyncio.run(scenario(args, log))
    doc = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "make demo  # python -m nnoculation.benchmarks.online_demo --out " + args.out,
        "commit": commit(),
        "machine": {**machine(), "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "wall_seconds": round(time.monotonic() - started, 1),
        "result": result,
        **{k: result[k] for k in ("before", "after", "quarantine_precision",
                                  "requests_until_repair", "repair_seconds", "swap_seconds",
                                  "seconds_to_immunity", "failed_requests")},
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "demo.md").write_text(
        markdown(doc) + f"\n\nMade by `{doc['command']}` at commit `{doc['commit']}`, torch "
        f"{doc['machine']['torch']}, {doc['machine']['device']}, {doc['generated']}; "
        f"{doc['wall_seconds']} s in all.\n"
    )
    print(markdown(doc))
    if result["failed_requests"] or not result["target_met"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
