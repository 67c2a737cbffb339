"""A real Prometheus (Debian's ``prometheus``) scraping a real deployment: a private Redis,
``nnoculation serve --workers 2`` and ``nnoculation worker``. Prometheus runs
deploy/prometheus/prometheus-k8s.yml's relabeling, its Kubernetes discovery swapped for a file
of pods with the same meta labels, and loads deploy/prometheus/alerts.yml. The test sends a
known mix of requests and reads the counts back from Prometheus's HTTP API; then it queues a
repair while no worker runs (the in-flight gauges), starts the worker, and sees the repair's
end counted by the worker's metrics."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from nnoculation.benchmarks.processes import Child, free_port, redis_server, wait_until
from tests.online import (
    PNG_HEADERS,
    ApiServer,
    WorkerProcess,
    clean_pngs,
    new_prefix,
    online_env,
    poisoned_pngs,
    publish,
)
from tests.test_monitoring import (
    PROM_DIR,
    all_panels,
    dashboard,
    exported_metric_names,
    k8s_config_with_file_sd,
)

T = TypeVar("T")
NAMESPACE = "nnoc-e2e"
RULE_GROUPS = {"nnoculation-quarantine", "nnoculation-repairs", "nnoculation-serving"}
# Alerts that would be pending or firing if the job names, labels or version gauges were wrong.
MUST_STAY_QUIET = {"NnocNoActiveModel", "NnocVersionSkew", "NnocNoWorker", "NnocHigh5xxRate"}
# Dashboard panels that must show data after the test's traffic.
MUST_SHOW_DATA = {
    "Request rate by route", "Errors by route and status",
    "Request duration by route (p50 / p95 / p99)", "Predictions by outcome",
    "Predictions by model version", "Disagreement rate", "Quarantine size",
    "Pending inputs by BadNet label", "Quarantine writes by result", "Version per process",
    "Processes per version", "Repair in flight", "Recent repairs by status", "Batch sizes",
    "Batch queue depth", "Queue wait and inference (p95)", "Targets up",
}  # fmt: skip


def pod(name: str, port: int, component: str, **meta: str) -> dict[str, Any]:
    """A file_sd entry shaped like a pod from Kubernetes pod discovery."""
    labels = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "nnoculation",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
        "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
    }
    labels.update(meta)
    # Pod discovery's address is podIP:containerPort; the port annotation replaces the port.
    return {"targets": ["127.0.0.1:1"], "labels": labels}


class Prometheus(Child):
    """``prometheus`` on a free loopback port with its own storage."""

    def __init__(self, config: dict[str, Any], work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            {"PATH": "/usr/bin:/bin"}, work / "prometheus.log",
        )  # fmt: skip

    def wait_ready(self) -> None:
        self.wait_http(f"{self.url}/-/ready", 20, "prometheus to be ready")

    def api(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant query as {"label=value,...": value} (the metric name left out)."""
        results = self.api("query", query=expr)["result"]
        return {key(r["metric"]): float(r["value"][1]) for r in results}


def key(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__")


# Waits end as soon as the value is there; the slack only matters on a loaded 2-core machine.
TIMEOUT_SLACK = 3.0


def eventually(get: Callable[[], T], expected: T, timeout_s: float, what: str) -> None:
    """Poll ``get`` until it returns ``expected``; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout_s * TIMEOUT_SLACK
    while True:
        value = get()
        if value == expected or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert value == expected, f"{what}: Prometheus has {value}, the test expected {expected}"


def send(api: ApiServer, images: list[bytes]) -> list[bool]:
    """POST each image as an admin (admins learn whether it was quarantined)."""
    with api.admin() as admin:
        flags = []
        for data in images:
            response = admin.post("/predict", content=data, headers=PNG_HEADERS)
            assert response.status_code == 200, response.text
            flags.append(bool(response.json()["quarantined"]))
    return flags


def pods_file(path: Path, api_port: int, worker_port: int) -> Path:
    """The API and worker pods, and three that the relabeling must drop."""
    path.write_text(json.dumps([
        pod("nnoc-api-0", api_port, "api"),
        pod("nnoc-worker-0", worker_port, "worker"),
        pod("nnoc-redis-0", 6379, "redis",
            __meta_kubernetes_pod_annotation_prometheus_io_scrape="false"),
        pod("nnoc-api-1", api_port, "api", __meta_kubernetes_pod_phase="Pending"),
        pod("grafana-0", 3000, "grafana",
            __meta_kubernetes_pod_label_app_kubernetes_io_name="grafana"),
    ]))  # fmt: skip
    return path


def check_traffic(prometheus: Prometheus, api: ApiServer, attack: Any) -> None:
    """A known mix of requests, read back from Prometheus: clean inputs once, triggered ones
    twice (the second time a duplicate: a prediction, not a new stored input), and three
    bodies that are no image."""
    clean, poisoned = clean_pngs(16, seed=70), poisoned_pngs(attack, 24, seed=71)
    sent = clean + poisoned + poisoned
    flags = send(api, sent)
    with api.client() as client:
        for _ in range(3):
            assert client.post("/predict", content=b"", headers=PNG_HEADERS).status_code == 422
    quarantined = sum(flags)
    distinct = len({img for img, flag in zip(sent, flags, strict=True) if flag})
    assert quarantined >= 10 and 0 < distinct < 50, (quarantined, distinct)

    eventually(lambda: prometheus.query(
        'sum by (outcome) (nnoc_predictions_total{job="nnoculation-api"})'),
        {"outcome=agree": len(sent) - quarantined, "outcome=quarantined": quarantined,
         "outcome=rejected": 3}, 15, "predictions by outcome")  # fmt: skip
    eventually(lambda: prometheus.query(
        'sum by (status) (nnoc_http_requests_total{route="/predict", method="POST"})'),
        {"status=200": len(sent), "status=422": 3}, 5, "/predict requests")  # fmt: skip
    series = {"instance": f"127.0.0.1:{api.port}", "job": "nnoculation-api",
              "namespace": NAMESPACE, "pod": "nnoc-api-0", "version": "v0001"}  # fmt: skip
    eventually(lambda: prometheus.query("nnoc_quarantine_pending"), {key(series): distinct},
               10, "pending quarantined inputs")  # fmt: skip
    eventually(lambda: prometheus.query("sum(nnoc_quarantine_stored)"), {"": distinct}, 5,
               "stored quarantined inputs")  # fmt: skip
    eventually(lambda: prometheus.query("sum(nnoc_quarantine_pending_by_badnet_label)"),
               {"": distinct}, 5, "pending by BadNet label")  # fmt: skip
    versions = prometheus.query("nnoc_active_version_info == 1")
    assert len(versions) == 2 and all("version=v0001" in k for k in versions), versions


def queue_a_cancelled_repair(prometheus: Prometheus, api: ApiServer) -> None:
    """A repair started (and cancelled) while no worker runs stays in flight: the API's
    gauges show it since its creation time."""
    with api.admin() as admin:
        started = admin.post("/admin/repair")
        assert started.status_code == 202, started.text
        rid = started.json()["repair_id"]
        created = admin.get(f"/admin/repairs/{rid}").json()["created"]
        assert admin.post(f"/admin/repairs/{rid}/cancel").status_code == 200
    eventually(lambda: prometheus.query(
        "max(nnoc_repair_started_timestamp_seconds) * max(nnoc_repair_in_flight)"),
        {"": created}, 10, "the repair's start time")  # fmt: skip


def check_repair_ended(prometheus: Prometheus) -> None:
    """The worker ended the repair (cancelled before it started): its own metrics count it,
    and the API's in-flight gauges drop back to 0."""
    eventually(lambda: prometheus.query(
        'sum by (status) (nnoc_repairs_total{job="nnoculation-worker"})'),
        {"status=cancelled": 1}, 25, "repairs ended, from the worker")  # fmt: skip
    eventually(lambda: prometheus.query(
        "max(nnoc_repair_started_timestamp_seconds) + max(nnoc_repair_in_flight)"),
        {"": 0}, 10, "no repair in flight")  # fmt: skip


def check_targets_and_rules(prometheus: Prometheus) -> None:
    """Both pods scraped under the job names the alerts use, the others dropped; every rule
    loaded and evaluated without error; none of the alerts a healthy deployment must not
    raise is pending or firing; the scraped names are the ones test_monitoring maps."""
    targets = prometheus.api("targets")
    active = {(t["labels"]["job"], t["labels"]["pod"]) for t in targets["activeTargets"]}
    assert active == {("nnoculation-api", "nnoc-api-0"), ("nnoculation-worker", "nnoc-worker-0")}
    assert len(targets["droppedTargets"]) == 3
    eventually(lambda: {t["health"] for t in prometheus.api("targets")["activeTargets"]},
               {"up"}, 5, "target health")  # fmt: skip

    def rules() -> list[dict[str, Any]]:
        groups = prometheus.api("rules")["groups"]
        assert {g["name"] for g in groups} == RULE_GROUPS
        return [r for g in groups for r in g["rules"]]

    assert len(rules()) == 12
    eventually(lambda: {r["health"] for r in rules()}, {"ok"}, 5, "rule health")
    raised = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
    assert not raised & MUST_STAY_QUIET, raised

    scraped = {n for n in prometheus.api("label/__name__/values") if n.startswith("nnoc_")}
    assert scraped <= exported_metric_names(), scraped - exported_metric_names()
    assert {"nnoc_repairs_total", "nnoc_repair_duration_seconds_bucket"} <= scraped


def check_dashboard_queries(prometheus: Prometheus) -> None:
    """Every query of the Grafana dashboard (panels and annotations) is valid PromQL for the
    real server, and the panels that must show something after the traffic do."""
    board = dashboard()
    queries = [(p["title"], t["expr"]) for p in all_panels(board) for t in p.get("targets", [])]
    queries += [(a["name"], a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    with_data = set()
    for title, expr in queries:
        grafana_vars = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        try:
            result = prometheus.api("query", query=expr)["result"]
        except AssertionError as err:  # Prometheus refused the query
            raise AssertionError(f"dashboard query of {title!r}: {err}") from None
        if result:
            with_data.add(title)
    missing = MUST_SHOW_DATA - with_data
    assert not missing, f"dashboard panels without data: {missing}"


def test_prometheus_scrapes_what_the_test_sent(tmp_path: Path, tiny_deployment: Any) -> None:
    source, attack, _ = tiny_deployment
    store_root = tmp_path / "store"
    publish(store_root, source)
    worker_port = free_port()
    with redis_server(tmp_path / "redis") as redis, contextlib.ExitStack() as running:
        env = online_env(store_root, redis.url, new_prefix(), tmp_path, quarantine_n=10_000,
                         metrics_port=worker_port, repair_profile="mean-diff")  # fmt: skip
        api = ApiServer(env, tmp_path / "api.log", workers=2)
        running.callback(api.stop)
        pods = pods_file(tmp_path / "pods.json", api.port, worker_port)
        config = k8s_config_with_file_sd(pods, PROM_DIR / "alerts.yml", interval="1s")
        prometheus = Prometheus(config, tmp_path / "prometheus")
        running.callback(prometheus.stop)
        prometheus.wait_ready()
        api.wait_ready()
        with api.admin() as admin:
            wait_until(lambda: len(admin.get("/admin/status").json()["processes"]) == 2, 20,
                       "both API processes to report")  # fmt: skip
        check_traffic(prometheus, api, attack)
        queue_a_cancelled_repair(prometheus, api)
        worker = WorkerProcess(env, tmp_path / "worker.log")
        running.callback(worker.stop)
        check_repair_ended(prometheus)
        check_targets_and_rules(prometheus)
        check_dashboard_queries(prometheus)
