"""The README documents every setting, route and metric the code has (a new one without a line
in the README fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from nnoculation.online.settings import ENV_PREFIX
from service.app import create_app
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from tests.test_monitoring import alert_rules, all_panels, dashboard
from worker.settings import WorkerSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def mentioned(name: str, text: str = README) -> bool:
    """``name`` appears in ``text`` as a whole name, not as the start of a longer one
    (``/admin/repair`` is not documented by ``/admin/repairs``, nor ``NNOC_REPAIR`` by
    ``NNOC_REPAIR_PROFILE``)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?![\w/{{])", text) is not None


def test_every_setting_is_in_the_readme() -> None:
    names = {*ServiceSettings.model_fields, *WorkerSettings.model_fields}
    missing = [n for n in sorted(names) if not mentioned(f"`{ENV_PREFIX}{n.upper()}")]
    assert not missing, missing


def test_every_route_is_in_the_readme() -> None:
    paths = set(create_app(ServiceSettings()).openapi()["paths"])
    assert len(paths) >= 20
    documented = {p.replace("{v}", "{version}").replace("{id}", "{repair_id}") for p in
                  re.findall(r"(/[a-z/_{}.0-9]+)", README)}  # fmt: skip
    aliases = {"{archive_id}": "{id}", "{repair_id}": "{id}", "{version}": "{v}"}
    missing = []
    for path in sorted(paths):
        variants = {path}
        for long, short in aliases.items():
            variants |= {v.replace(long, short) for v in variants}
        if not any(mentioned(v) for v in variants) and not variants & documented:
            missing.append(path)
    assert not missing, missing


def test_every_metric_is_in_the_readme() -> None:
    metrics = ServiceMetrics()
    names = {m.name for m in metrics.registry.collect()}
    names |= {"nnoc_repairs_total", "nnoc_repair_duration_seconds"}  # the worker's
    missing = [n for n in sorted(names) if not mentioned(n) and not mentioned(f"{n}_total")]
    assert not missing, missing


OPERATIONS = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()


def test_operations_explains_every_alert_and_panel() -> None:
    alerts = [r["alert"] for r in alert_rules() if "alert" in r]
    panels = [p["title"] for p in all_panels(dashboard()) if p["type"] != "row"]
    assert len(alerts) >= 10 and len(panels) >= 15
    missing = [f"| {name} |" for name in [*alerts, *panels] if f"| {name} |" not in OPERATIONS]
    assert not missing, missing


def test_operations_names_only_real_settings() -> None:
    names = {f"{ENV_PREFIX}{n.upper()}" for n in (*ServiceSettings.model_fields,
                                                  *WorkerSettings.model_fields)}  # fmt: skip
    unknown = sorted(set(re.findall(r"NNOC_[A-Z_]+[A-Z]", OPERATIONS)) - names)
    assert not unknown, unknown
