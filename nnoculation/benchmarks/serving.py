"""Serving throughput and latency over HTTP, our service against LitServe, in one run.

Every configuration serves the same Fashion-MNIST patch BadNet (and, for the ensemble, its
GoodNet) in its default process layout (ours: 2 uvicorn workers; LitServe: 1 API server and 1
inference worker), one torch thread per process; ``wrk`` (another process, one thread)
POSTs the same 28x28 PNG as the raw body at concurrency 1, 4, 16 and 64 for ``--seconds``
each after a warm-up. Our service runs with quarantine, metrics and admin auth on; ``single``
serves the BadNet alone (``NNOC_NETS=badnet``), ``ensemble`` both nets, each with micro-batching
(``max_batch_size`` 32, ``max_wait_ms`` 2) and without. The peer is the BadNet behind LitServe
with its own batching at the same batch size and wait (:mod:`litserve_peer`).

    python -m nnoculation.benchmarks.serving --out docs/results

Needs ``wrk`` (Debian package) and ``litserve`` (PyPI); ``make results-serving`` installs both.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from models.store import ModelStore
from nnoculation.badnets import load_splits
from nnoculation.benchmarks.common import RUNS_DIR, commit, machine
from nnoculation.benchmarks.processes import (
    Child,
    api_server,
    free_port,
    redis_url_for,
    wait_until,
)
from nnoculation.benchmarks.repair import deployment_for
from nnoculation.inputs import encode_png
from nnoculation.recipes import FASHION_MNIST_RECIPE

DEPLOYMENT = "serving"
# Each system in its default process layout, two processes each: ours 2 uvicorn workers
# (NNOC_WORKERS), LitServe 1 API server + 1 inference worker (its default for one worker; a
# second API server measured no faster in a trial here). One torch thread per process.
API_WORKERS = 2
CONFIGS = (
    ("single", "unbatched"),
    ("single", "batched"),
    ("ensemble", "unbatched"),
    ("ensemble", "batched"),
    ("peer", "batched"),
)
CONCURRENCY = (1, 4, 16, 64)
MAX_BATCH = 32
MAX_WAIT_MS = 2.0
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local f = io.open(os.getenv("NNOC_BENCH_IMAGE"), "rb")
wrk.body = f:read("*all")
f:close()
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, p50 and p99 (ms) and the count of non-2xx answers from ``wrk --latency``."""

    def latency(pct: str) -> float:
        match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
        if not match:
            raise ValueError(f"no {pct}% latency in wrk output:\n{text}")
        return round(float(match.group(1)) * _UNITS[match.group(2)], 2)

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    if not rps:
        raise ValueError(f"no Requests/sec in wrk output:\n{text}")
    return {
        "rps": round(float(rps.group(1)), 1),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else "",
    }


def run_wrk(url: str, concurrency: int, seconds: float, script: Path, image: Path) -> str:
    env = {**os.environ, "NNOC_BENCH_IMAGE": str(image)}
    result = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "--timeout", "10s",
         "-s", str(script), url],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return result.stdout


def median_row(cells: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """One concurrency level over the repeats: the median of each figure, and every sample."""
    row: dict[str, Any] = {"concurrency": cells[0]["concurrency"]}
    for key in ("rps", "p50_ms", "p99_ms"):
        row[key] = round(statistics.median(c[key] for c in cells), 2)
    row["non_2xx"] = sum(c["non_2xx"] for c in cells)
    row["samples"] = {key: [c[key] for c in cells] for key in ("rps", "p50_ms", "p99_ms")}
    return row


def sweep(url: str, args: argparse.Namespace, script: Path, image: Path, log: Any) -> list[Any]:
    run_wrk(url, 16, args.warmup, script, image)
    rows = []
    for c in CONCURRENCY:
        row = {"concurrency": c, **parse_wrk(run_wrk(url, c, args.seconds, script, image))}
        log(f"    c={c:3d}: {row['rps']:8.1f} req/s  p50 {row['p50_ms']:6.2f} ms  "
            f"p99 {row['p99_ms']:6.2f} ms  non-2xx {row['non_2xx']}")  # fmt: skip
        rows.append(row)
    return rows


@contextmanager
def litserve_peer(store: Path, log_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = Child(
        [sys.executable, "-m", "nnoculation.benchmarks.litserve_peer", "--store", str(store),
         "--deployment", DEPLOYMENT, "--port", str(port), "--max-batch-size", str(MAX_BATCH),
         "--batch-timeout-ms", str(MAX_WAIT_MS)],
        env, log_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 120,
                   "LitServe to be ready")  # fmt: skip
        yield url
    finally:
        child.stop()


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Serving: throughput and latency over HTTP",
        "",
        f"Ours: {API_WORKERS} uvicorn workers; LitServe: 1 API server + 1 inference worker; one "
        "torch thread per process. `wrk` (one thread) POSTs the same 28x28 PNG as the raw body for "
        f"{doc['seconds_per_cell']} s per cell, in {doc['repeats']} rounds over all "
        "configurations; each figure is the median of the rounds (every sample is in "
        "`serving.json`). Ours: quarantine, metrics and admin auth on; "
        f"batched = micro-batching with max_batch_size {MAX_BATCH}, max_wait_ms {MAX_WAIT_MS}. "
        "Peer: the BadNet behind LitServe with its own batching at the same size and wait.",
        "",
        "| system | batching | concurrency | requests/s | p50 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for system in ("single", "ensemble", "peer"):
        for mode, rows in doc[system].items():
            for r in rows:
                lines.append(
                    f"| {system} | {mode} | {r['concurrency']} | {r['rps']} | {r['p50_ms']} | "
                    f"{r['p99_ms']} | {r['non_2xx']} |"
                )
    lines += ["", "Targets (issue 9), at concurrency 16 unless said:", ""]
    for name, verdict in doc["targets"].items():
        lines.append(f"- {name}: {verdict['value']} -> **{'met' if verdict['met'] else 'missed'}**")
    return "\n".join(lines)


def at(rows: list[dict[str, Any]], c: int) -> dict[str, Any]:
    return next(r for r in rows if r["concurrency"] == c)


def targets(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s, e, p = doc["single"], doc["ensemble"], doc["peer"]["batched"]
    ratio_ens = at(e["batched"], 16)["rps"] / at(s["batched"], 16)["rps"]
    ratio_peer = at(s["batched"], 16)["rps"] / at(p, 16)["rps"]
    ratio_ens_peer = at(e["batched"], 16)["rps"] / at(p, 16)["rps"]
    out = {
        "ensemble >= 0.6x single (batched)": (ratio_ens, ratio_ens >= 0.6),
        "batched single >= 1.5x peer": (ratio_peer, ratio_peer >= 1.5),
        "batched ensemble >= 1.0x peer": (ratio_ens_peer, ratio_ens_peer >= 1.0),
    }
    verdicts = {k: {"value": f"{v:.2f}x", "met": ok} for k, (v, ok) in out.items()}
    for system in ("single", "ensemble"):
        added_ms = (
            at(doc[system]["batched"], 1)["p50_ms"] - at(doc[system]["unbatched"], 1)["p50_ms"]
        )
        verdicts[f"{system}: p50 added by batching at concurrency 1 <= {MAX_WAIT_MS + 1} ms"] = {
            "value": f"{added_ms:+.2f} ms", "met": added_ms <= MAX_WAIT_MS + 1,
        }  # fmt: skip
        p99b = at(doc[system]["batched"], 16)["p99_ms"]
        p99u = at(doc[system]["unbatched"], 16)["p99_ms"]
        verdicts[f"{system}: batched p99 <= unbatched p99"] = {
            "value": f"{p99b} vs {p99u} ms", "met": p99b <= p99u,
        }  # fmt: skip
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default=str(RUNS_DIR))
    parser.add_argument("--work", default="runs/serving")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the configurations")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (apt-get install wrk)")
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    recipe = FASHION_MNIST_RECIPE
    splits = load_splits(recipe)
    bundle, _, _ = deployment_for("patch", recipe, splits, Path(args.runs))
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    store = work / "store"
    ModelStore(store).import_bundle(DEPLOYMENT, bundle.path, activate=True)
    image = work / "image.png"
    image.write_bytes(encode_png(splits.test.images[0]))
    script = work / "post.lua"
    script.write_text(LUA)
    doc: dict[str, Any] = {"single": {}, "ensemble": {}, "peer": {}}
    with redis_url_for(args.redis_url, work / "redis") as redis_url:
        base = {k: v for k, v in os.environ.items() if not k.startswith("NNOC_")}
        base.pop("PROMETHEUS_MULTIPROC_DIR", None)
        base.update({
            "NNOC_REDIS_URL": redis_url, "NNOC_KEY_PREFIX": f"bench{secrets.token_hex(4)}",
            "NNOC_DEPLOYMENT": DEPLOYMENT, "NNOC_STORE_ROOT": str(store),
            "NNOC_SPOOL_DIR": str(work / "spool"), "NNOC_ADMIN_TOKEN": secrets.token_hex(16),
            "NNOC_THREADS": "1", "NNOC_MAX_BATCH_SIZE": str(MAX_BATCH),
            "NNOC_MAX_WAIT_MS": str(MAX_WAIT_MS), "NNOC_QUARANTINE_N": "100000",
        })  # fmt: skip
        samples: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
        for round_ in range(args.repeats):
            # Rounds visit the configurations in turn, so slow phases of a shared machine
            # spread over all of them instead of landing on one.
            for system, mode in CONFIGS:
                log(f"round {round_ + 1}/{args.repeats}: {system}, {mode}")
                if system == "peer":
                    server = litserve_peer(store, work / "litserve.log")
                else:
                    nets = "badnet" if system == "single" else "ensemble"
                    env = {**base, "NNOC_NETS": nets, "NNOC_BATCHING": str(mode == "batched")}
                    server = api_server(env, work / f"api-{system}-{mode}.log", API_WORKERS)
                with server as url:
                    rows = sweep(f"{url}/predict", args, script, image, log)
                samples.setdefault((system, mode), []).append(rows)
        for (system, mode), runs in samples.items():
            doc[system][mode] = [median_row(cells) for cells in zip(*runs, strict=True)]
    doc["targets"] = targets(doc)
    doc.update({
        "seconds": round(time.monotonic() - started, 1),
        "seconds_per_cell": args.seconds,
        "repeats": args.repeats,
        "commit": commit(),
        "layout": {"ours": f"{API_WORKERS} uvicorn workers, 1 torch thread each",
                   "peer": "LitServe: 1 API server + 1 inference worker, 1 torch thread"},
        "machine": {**machine(), "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "cores": len(os.sched_getaffinity(0))},
        "command": "make results-serving  # python -m nnoculation.benchmarks.serving",
        "load_generator": subprocess.run(["wrk", "--version"], capture_output=True,
                                         text=True).stdout.splitlines()[0],
        "peer_version": _version("litserve"),
    })  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "serving.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "serving.md").write_text(
        markdown(doc) + f"\n\nMade by `{doc['command']}` at commit `{doc['commit']}`, torch "
        f"{doc['machine']['torch']}, {doc['machine']['device']} ({doc['machine']['cores']} cores), "
        f"{doc['load_generator']}, LitServe {doc['peer_version']}; {doc['seconds']} s in all.\n"
    )
    print(markdown(doc))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
