"""Helpers for the online tests: a private Redis with AOF, a tiny deployment in a store, and
the API and the worker as real processes."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
import torch

from models.bundle import load_bundle, write_bundle
from models.store import ModelStore
from nnoculation.attacks import AttackSpec
from nnoculation.benchmarks.processes import (
    Child,
    free_port,
    nnoculation,
)
from nnoculation.data.imageset import ImageSet
from nnoculation.inputs import encode_png
from nnoculation.online.keys import Keys
from tests.conftest import NUM_CLASSES, SIDE, synthetic_set
from tests.deployment_fixtures import make_deployment, patch_attack, triggered

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"
DEPLOYMENT = "tiny"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


PNG_HEADERS = {"content-type": "image/png"}


class Load(threading.Thread):
    """Requests in a loop from one thread; keeps every status and answering version."""

    def __init__(self, url: str, images: list[bytes], admin_token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.images = url, images
        self.headers = {**PNG_HEADERS}
        if admin_token:
            self.headers["Authorization"] = f"Bearer {admin_token}"
        self.stop = threading.Event()
        self.results: list[tuple[int, dict[str, Any] | None, bytes]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as client:
            i = 0
            while not self.stop.is_set():
                data = self.images[i % len(self.images)]
                try:
                    r = client.post("/predict", content=data, headers=self.headers)
                    self.results.append(
                        (r.status_code, r.json() if r.status_code == 200 else None, data)
                    )
                except httpx.HTTPError as err:
                    self.errors.append(repr(err))
                i += 1

    def finish(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(20)


def tiny_deployment_source(cache: Path) -> tuple[Path, AttackSpec, ImageSet]:
    """Train the tiny patch BadNet + GoodNet once per test session (a few seconds)."""
    bundle = cache / "bundle"
    if not (bundle / "manifest.json").exists():
        from models.classifiers import build_classifier
        from models.nets import Net
        from models.spec import InputSpec

        spec = InputSpec(1, SIDE, SIDE, (0.3,), (0.3,))
        torch.manual_seed(0)
        net = Net(
            build_classifier("small_cnn", spec, NUM_CLASSES, width=4), "zoo", spec,
            NUM_CLASSES, "small_cnn", {"width": 4},
        )  # fmt: skip
        make_deployment(net, cache)
    return bundle, patch_attack(), synthetic_set(200, seed=14)


def publish(store_root: Path, source: Path, deployment: str = DEPLOYMENT) -> str:
    """Publish a copy of the bundle at ``source`` into the store and activate it."""
    bundle = load_bundle(source)

    def build(directory: Path, version: str) -> Any:
        return write_bundle(
            directory,
            name=bundle.manifest.name,
            version=version,
            parent=None,
            spec=bundle.spec,
            class_names=bundle.class_names,
            nets={role: bundle.net(role) for role in bundle.roles},
            tensors={"validation": bundle.tensors("validation")},
            metrics=bundle.manifest.metrics,
            provenance=bundle.manifest.provenance,
        )

    return ModelStore(store_root).publish(deployment, build, activate=True)


def poisoned_pngs(attack: AttackSpec, count: int, seed: int) -> list[bytes]:
    images = triggered(attack, synthetic_set(count, seed=seed).images)
    return [encode_png(image) for image in images]


def clean_pngs(count: int, seed: int) -> list[bytes]:
    return [encode_png(image) for image in synthetic_set(count, seed=seed).images]


def online_env(
    store_root: Path, redis_url: str, prefix: str, work: Path, **extra: Any
) -> dict[str, str]:
    """Environment of an API or worker process of the test deployment."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("NNOC_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }  # fmt: skip
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "NNOC_REDIS_URL": redis_url,
            "NNOC_STORE_ROOT": str(store_root),
            "NNOC_DEPLOYMENT": DEPLOYMENT,
            "NNOC_KEY_PREFIX": prefix,
            "NNOC_SPOOL_DIR": str(work / "spool"),
            "NNOC_ADMIN_TOKEN": ADMIN_TOKEN,
            "NNOC_THREADS": "1",
            "NNOC_POLL_INTERVAL_S": "1",
            "NNOC_RECONCILE_INTERVAL_S": "1",
            "NNOC_HEARTBEAT_TTL_S": "3",
            "NNOC_REPAIR_BACKOFF_S": "0",
            "NNOC_METRICS_PORT": "0",
            "NNOC_REPAIR_PROFILE": "test",
            "NNOC_WORK_DIR": str(work / "repairs"),
        }
    )
    env.update({f"NNOC_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def new_prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


def forget_prefix(prefix: str, redis_url: str = DEFAULT_REDIS_URL) -> None:
    """Delete a test's keys (``prefix``) and its RQ queue from a shared Redis."""
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.delete(f"rq:queue:{Keys(prefix, DEPLOYMENT).queue}")


class ApiServer(Child):
    """``nnoculation serve`` on a free port."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            nnoculation("serve", "--port", str(self.port), "--workers", str(workers),
                        "--log-level", "warning"),
            env, log, cwd=ROOT,
        )  # fmt: skip

    def wait_ready(self, timeout_s: float = 60) -> None:
        self.wait_http(f"{self.url}/readyz", timeout_s, "the API to be ready")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


class WorkerProcess(Child):
    """``nnoculation worker``."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        super().__init__(nnoculation("worker"), env, log, cwd=ROOT)
