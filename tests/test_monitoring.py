"""The monitoring files under deploy/: Prometheus configs and alert rules checked and
unit-tested with promtool (Debian's ``prometheus`` package), and the Grafana dashboard (Grafana
itself does not install here) parsed and cross-checked: every query names a metric the API or
the worker exports, every panel reads the provisioned data source, the layout is sane. The
compose file and the Kubernetes manifests are checked to wire these files up the way they
expect."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "nnoculation.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "nnoculation.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
API_JOB, WORKER_JOB = "nnoculation-api", "nnoculation-worker"
# Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

# --- PromQL: the metric names an expression reads ---------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
    "or", "unless", "inf", "nan",
}  # fmt: skip
_NAME = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    '('), keywords, label names (inside {...} or by/without/on/ignoring lists), label values
    (strings), durations (inside [...] or after offset) or numbers."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _CLAUSE.sub(" ", s)
    s = re.sub(r"\boffset\s+-?[\w$]+", " ", s)
    return {m for m in _NAME.findall(s) if m not in _KEYWORDS}


def jobs_selected(expr: str) -> set[str]:
    """The values of ``job="..."`` / ``job=~"..."`` matchers in an expression."""
    return set(re.findall(r'\bjob=~?"([^"]*)"', expr))


def exported_metric_names() -> set[str]:
    """Every series name the API (``ServiceMetrics``) and the worker (``worker.metrics``)
    can expose, with the suffixes the exposition adds per metric type."""
    import worker.metrics as worker_metrics
    from service.metrics import ServiceMetrics

    families = list(ServiceMetrics().registry.collect())
    for metric in (worker_metrics.repairs, worker_metrics.repair_duration):
        families += list(metric.collect())
    suffixes = {
        "counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"), "info": ("_info",),
    }  # fmt: skip
    return {f.name + s for f in families for s in suffixes[f.type]}


def test_metric_names_are_read_from_promql() -> None:
    cases = {
        'sum by (route, le) (rate(nnoc_x_bucket{job="a", status=~"5.."}[$__rate_interval]))':
            {"nnoc_x_bucket"},
        "a / ignoring (label) group_left sum without (label) (max without (instance) (b)) > 0.8"
        " and ignoring(label) c >= 50": {"a", "b", "c"},
        "time() - max(x_seconds offset 1m) > 2 * 3600 and 1e3 < y": {"x_seconds", "y"},
        'absent(up{job="nnoculation-worker"})': {"up"},
        "histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m])))": {"h_bucket"},
        "(x - x offset 1m > 0) or (y unless y offset 1h)": {"x", "y"},
        'z{status=~"failed|gated"} > bool 0': {"z"},
        "count without (version) (count without (instance, pod, pid) (v == 1)) > 1": {"v"},
        "sum(rate(m_total[5m:1m])) / on (job) group_left count(n:recorded)": {
            "m_total", "n:recorded",
        },
    }  # fmt: skip
    for expr, names in cases.items():
        assert metric_names(expr) == names, expr


def test_exported_names_map_metric_types_to_series() -> None:
    names = exported_metric_names()
    assert {
        "nnoc_predictions_total",
        "nnoc_http_request_duration_seconds_bucket",
        "nnoc_quarantine_stored",
        "nnoc_repairs_total",
        "nnoc_repair_duration_seconds_count",
        "nnoc_repair_started_timestamp_seconds",
    } <= names
    assert "nnoc_predictions" not in names and "nnoc_http_request_duration_seconds" not in names


# --- Prometheus config and alert rules -------------------------------------------------------


def promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    assert Path(PROMTOOL).exists(), "promtool is missing: `make tools` installs Debian's prometheus"
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(PROM_DIR / "alerts.yml")["groups"] for r in g["rules"]]


def test_promtool_accepts_the_compose_config_and_its_rules() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout and "12 rules found" in done.stdout


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """The near-cap tests against rules with that alert's threshold changed must fail."""
    rules = (PROM_DIR / "alerts.yml").read_text()
    assert rules.count("> 0.8 * max without") == 1
    changed = rules.replace("> 0.8 * max without", "> 0.9 * max without")
    (tmp_path / "alerts.yml").write_text(changed)
    suite = load_yaml(PROM_DIR / "alerts_test.yml")
    suite["tests"] = [
        t for t in suite["tests"]
        if any(c["alertname"] == "NnocQuarantineNearCap" for c in t["alert_rule_test"])
    ]  # fmt: skip
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(suite))
    done = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert done.returncode != 0 and "NnocQuarantineNearCap" in done.stdout + done.stderr
    (tmp_path / "alerts.yml").write_text(rules)
    done = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_documented_and_unit_tested_both_ways() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) == 12
    tests = load_yaml(PROM_DIR / "alerts_test.yml")["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and len(annotations["description"]) > 80, rule["alert"]
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c.get("exp_alerts") for c in mine), f"no test makes {rule['alert']} fire"
        assert any(not c.get("exp_alerts") for c in mine), f"no test keeps {rule['alert']} silent"
    # The issue's list, by what each alert watches.
    watched = {r["alert"]: metric_names(r["expr"]) for r in rules}
    for metric in ("nnoc_quarantine_stored", "nnoc_quarantine_cap", "nnoc_disagreement_ratio",
                   "nnoc_repairs_total", "nnoc_repair_started_timestamp_seconds",
                   "nnoc_active_version_info", "nnoc_http_requests_total",
                   "nnoc_quarantine_pending_by_badnet_label", "up"):  # fmt: skip
        assert any(metric in used for used in watched.values()), metric


def test_alerts_read_only_exported_metrics_and_the_scraped_jobs() -> None:
    exported = exported_metric_names() | SYNTHETIC
    config = load_yaml(PROM_DIR / "prometheus.yml")
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert jobs == {API_JOB, WORKER_JOB}
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        assert used and used <= exported, (rule["alert"], used - exported)
        for selected in jobs_selected(rule["expr"]):
            assert any(re.fullmatch(selected, job) for job in jobs), (rule["alert"], selected)


def test_compose_config_scrapes_the_api_and_the_worker() -> None:
    config = load_yaml(PROM_DIR / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    targets = {
        c["job_name"]: [t for s in c["static_configs"] for t in s["targets"]]
        for c in config["scrape_configs"]
    }
    assert targets == {API_JOB: ["api:8000"], WORKER_JOB: ["worker:9101"]}


def k8s_config_with_file_sd(pods_file: Path, rules: Path, interval: str = "15s") -> dict[str, Any]:
    """prometheus-k8s.yml with its Kubernetes discovery swapped for a file of pods carrying
    the same ``__meta_kubernetes_*`` labels, so a Prometheus without Kubernetes (Debian's
    build has no Kubernetes discovery) runs the very same relabeling."""
    config = copy.deepcopy(load_yaml(PROM_DIR / "prometheus-k8s.yml"))
    config["global"].update({"scrape_interval": interval, "evaluation_interval": interval})
    config["rule_files"] = [str(rules)]
    for scrape in config["scrape_configs"]:
        assert scrape.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        scrape["file_sd_configs"] = [{"files": [str(pods_file)], "refresh_interval": "1s"}]
    return config


def test_k8s_config_relabels_annotated_pods(tmp_path: Path) -> None:
    config = load_yaml(PROM_DIR / "prometheus-k8s.yml")
    (scrape,) = config["scrape_configs"]
    relabel = {tuple(r["source_labels"]): r for r in scrape["relabel_configs"]}
    assert relabel[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["action"] == "keep"
    assert relabel[("__meta_kubernetes_pod_label_app_kubernetes_io_component",)][
        "target_label"] == "job"  # fmt: skip
    # promtool checks everything but the discovery itself (relabel regexes, rule files).
    pods = tmp_path / "pods.json"
    pods.write_text("[]")
    shutil.copy(PROM_DIR / "alerts.yml", tmp_path)
    swapped = k8s_config_with_file_sd(pods, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(swapped))
    done = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_k8s_pods_carry_what_the_scrape_config_keeps() -> None:
    """The API and worker pod templates of deploy/k8s are annotated for scraping, labelled
    the way prometheus-k8s.yml keeps and names them, on a port their container opens."""
    found = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in {"Deployment", "StatefulSet"}:
                continue
            template = doc["spec"]["template"]
            annotations = template["metadata"].get("annotations", {})
            if annotations.get("prometheus.io/scrape") != "true":
                continue
            labels = template["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "nnoculation", path
            component = labels["app.kubernetes.io/component"]
            ports = {
                p["containerPort"] for c in template["spec"]["containers"]
                for p in c.get("ports", [])
            }  # fmt: skip
            assert int(annotations["prometheus.io/port"]) in ports, (path, annotations)
            assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
            found[doc["metadata"]["name"]] = component
    assert {"api", "worker"} <= set(found.values()), found


def test_compose_mounts_the_monitoring_files_where_they_are_read() -> None:
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    prometheus = compose["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus
    grafana = {v.split(":")[0]: v.split(":")[1] for v in compose["grafana"]["volumes"]}
    assert grafana["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(PROVIDERS)["providers"]
    assert grafana["./deploy/grafana/dashboards"] == provider["options"]["path"]
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose


# --- Grafana dashboard -----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # collapsed rows hold their panels
    return out


def test_dashboard_reads_the_provisioned_data_source() -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus" and source["uid"]
    board = dashboard()
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    assert variable["current"]["value"] == source["uid"]
    allowed = ({"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
               {"type": "prometheus", "uid": source["uid"]})  # fmt: skip
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] in allowed, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) in allowed, panel["title"]
    for annotation in board["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] in allowed, annotation["name"]


def test_dashboard_queries_name_only_exported_metrics() -> None:
    exported = exported_metric_names() | SYNTHETIC
    board = dashboard()
    exprs = [(p["title"], t["expr"]) for p in all_panels(board) for t in p.get("targets", [])]
    exprs += [(a["name"], a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    assert len(exprs) > 30
    jobs = {API_JOB, WORKER_JOB}
    for title, expr in exprs:
        used = metric_names(expr)
        assert used and used <= exported, (title, used - exported)
        for selected in jobs_selected(expr):
            assert any(re.fullmatch(selected, job) for job in jobs), (title, selected)


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    board = dashboard()
    panel_exprs = " ".join(t["expr"] for p in all_panels(board) for t in p.get("targets", []))
    for wanted in ("sum by (route) (rate(nnoc_http_requests_total",  # rate per endpoint
                   'nnoc_http_requests_total{job="nnoculation-api", status=~"[45].."}',  # errors
                   "sum by (route, le) (rate(nnoc_http_request_duration_seconds_bucket",  # time
                   "nnoc_disagreement_ratio", "nnoc_quarantine_stored", "nnoc_batch_size_bucket",
                   "nnoc_batch_queue_depth", "nnoc_active_version_info"):  # fmt: skip
        assert wanted in panel_exprs, wanted
    annotated = {n for a in board["annotations"]["list"] for n in metric_names(a.get("expr", ""))}
    assert {"nnoc_repairs_total", "nnoc_swaps_total"} <= annotated
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]


def test_dashboard_panel_ids_and_layout_are_sane() -> None:
    board = dashboard()
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] != "row":
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
            assert panel.get("description"), panel["title"]
