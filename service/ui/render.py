"""The dashboard's HTML, rendered on the server from what the admin API returns. Every value
goes through :func:`esc` (quarantined inputs and repair reasons come from outside); the page
has no script, so a strict Content-Security-Policy holds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

BASE = "/admin/ui"
STYLESHEET = f"{BASE}/dashboard.css"
# While a repair is in flight the page reloads itself this often to show its progress.
REFRESH_S = 10


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return escape("" if value is None else str(value), quote=True)


@dataclass
class Dashboard:
    """What the page shows (each part as the admin API answers it)."""

    status: dict[str, Any]
    quarantine: dict[str, Any]
    samples: dict[str, Any]
    repairs: list[dict[str, Any]]
    versions: dict[str, Any]
    notice: str | None = None
    csrf: str = ""
    sample_limit: int = 0


def _page(title: str, body: str, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}; url={BASE}">' if refresh else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'{meta}<title>{esc(title)}</title><link rel="stylesheet" href="{STYLESHEET}">'
        f"</head><body>{body}</body></html>\n"
    )


def login_page(error: str | None = None) -> str:
    """The token form shown to a browser without a session."""
    message = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = (
        '<main class="login"><h1>NNoculation dashboard</h1>'
        "<p>Sign in with the deployment's admin token (<code>NNOC_ADMIN_TOKEN</code>).</p>"
        f'{message}<form method="post" action="{BASE}/login">'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required>'
        '<button type="submit">Sign in</button></form></main>'
    )
    return _page("NNoculation: sign in", body)


def message_page(title: str, detail: str) -> str:
    """A refused or failed action, with the way back."""
    body = (
        f'<main class="login"><h1>{esc(title)}</h1><p class="error" role="alert">{esc(detail)}'
        f'</p><p><a href="{BASE}">Back to the dashboard</a></p></main>'
    )
    return _page(f"NNoculation: {title}", body)


def _form(action: str, label: str, csrf: str, css: str = "", confirm: str = "") -> str:
    title = f' title="{esc(confirm)}"' if confirm else ""
    return (
        f'<form method="post" action="{esc(action)}" class="inline">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        f'<button type="submit" class="{esc(css)}"{title}>{esc(label)}</button></form>'
    )


def _percent(value: Any) -> str:
    return f"{float(value):.1%}" if isinstance(value, int | float) else "–"


def _when(stamp: Any) -> str:
    """A Unix time or an ISO 8601 string (manifests), shown to the second in UTC."""
    if isinstance(stamp, str) and not stamp.replace(".", "", 1).isdigit():
        try:
            parsed = datetime.fromisoformat(stamp).astimezone(UTC)
        except ValueError:
            return esc(stamp)
        return parsed.strftime("%Y-%m-%d %H:%M:%S UTC")
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(stamp)))
    except (TypeError, ValueError):
        return "–"


def _card(title: str, value: str, detail: str = "", test_id: str = "") -> str:
    tid = f' data-testid="{esc(test_id)}"' if test_id else ""
    return (
        f'<section class="card"{tid}><h2>{esc(title)}</h2><p class="value">{value}</p>'
        f'<p class="detail">{detail}</p></section>'
    )


def _summary(view: Dashboard) -> str:
    status = view.status
    active = status.get("active_version")
    quarantine = status.get("quarantine") or {}
    pending = (quarantine.get("versions") or {}).get(active or "", {}).get("pending", 0)
    traffic = status.get("traffic") or {}
    processes = status.get("processes") or []
    served = ", ".join(f"pid {esc(p.get('pid'))}: {esc(p.get('version') or '–')}"
                       for p in processes)  # fmt: skip
    cards = [
        _card("Active version", esc(active or "none"),
              f"served by {served}" if served else "no live API process", "active-version"),
        _card("Quarantine", f"{esc(pending)} <small>/ N = {esc(status.get('n'))}</small>",
              f"pending inputs of {esc(active or '–')}; {esc(quarantine.get('size', 0))} stored "
              f"of cap {esc(quarantine.get('cap'))}, {esc(quarantine.get('overflow', 0))} "
              "refused at the cap", "quarantine-size"),
        _card("Disagreement rate", _percent(traffic.get("disagreement_rate")),
              f"{esc(traffic.get('disagreements', 0))} of {esc(traffic.get('requests', 0))} "
              f"inputs of {esc(active or '–')}", "disagreement-rate"),
    ]  # fmt: skip
    return '<div class="cards">' + "".join(cards) + "</div>"


def _progress(record: dict[str, Any]) -> str:
    epoch, epochs = record.get("epoch"), record.get("epochs")
    stage = esc(record.get("stage") or "waiting for a worker")
    if isinstance(epoch, int) and isinstance(epochs, int) and epochs > 0:
        return (
            f'{stage} <progress max="{epochs}" value="{epoch}"></progress> epoch {epoch}/{epochs}'
        )
    return stage


def _current_repair(view: Dashboard) -> str:
    current = view.status.get("current_repair")
    record = next((r for r in view.repairs if r.get("id") == current), None)
    if current is None:
        text = "No repair in flight."
    elif record is None:
        text = f"Repair {esc(current)} is in flight."
    else:
        text = (
            f"Repair <code>{esc(current)}</code> of {esc(record.get('version'))}: "
            f'<span class="status {esc(record.get("status"))}">{esc(record.get("status"))}'
            f"</span>, {_progress(record)}"
        )
    actions = _form(f"{BASE}/repair", "Repair now", view.csrf, "primary",
                    "repair the active version from its pending quarantine")  # fmt: skip
    actions += _form(f"{BASE}/rollback", "Roll back", view.csrf, "danger",
                     "activate the active version's parent")  # fmt: skip
    return (
        '<section class="panel" data-testid="current-repair"><h2>Current repair</h2>'
        f'<p>{text}</p><div class="actions">{actions}</div></section>'
    )


def _gallery(view: Dashboard) -> str:
    version = view.samples.get("version")
    items = view.samples.get("items") or []
    stats = (view.quarantine.get("versions") or {}).get(version or "", {})
    histogram = ", ".join(
        f"{esc(name)}: {esc(count)}" for name, count in (stats.get("badnet_classes") or {}).items()
    )
    figures = "".join(
        '<figure class="sample">'
        f'<img src="{BASE}/quarantine/{esc(item["sha256"])}.png" width="84" height="84" '
        f'alt="quarantined input {esc(item["sha256"][:12])}">'
        f'<figcaption><span class="bad">BadNet: {esc(item.get("badnet_class"))}</span>'
        f'<span class="good">GoodNet: {esc(item.get("goodnet_class"))}</span>'
        f'<span class="seen">seen {esc(item.get("count"))}×</span></figcaption></figure>'
        for item in items
    )
    shown = f"the first {len(items)}" if len(items) >= view.sample_limit else f"{len(items)}"
    lead = (
        f"{shown} pending inputs of {esc(version)} on which the BadNet and the GoodNet "
        "disagreed (the answer was the GoodNet's)."
        if items else f"No pending quarantined inputs of {esc(version or 'the active version')}."
    )  # fmt: skip
    hist = f"<p>BadNet labels of the pending inputs: {histogram}</p>" if histogram else ""
    return (
        '<section class="panel" data-testid="gallery"><h2>Quarantined inputs</h2>'
        f'<p>{lead}</p>{hist}<div class="gallery">{figures}</div></section>'
    )


def _ca(holdout: Any, net: str) -> str:
    if not isinstance(holdout, dict):
        return "–"
    return f"{_percent(holdout.get(f'{net}_before'))} → {_percent(holdout.get(f'{net}_after'))}"


def _verdict(record: dict[str, Any]) -> str:
    status, reason = record.get("status"), esc(record.get("reason"))
    if status == "published":
        return '<span class="status published">passed the gate</span>'
    if status == "gated":
        return f'<span class="status gated">refused by the gate</span> {reason}'
    if status in ("failed", "cancelled"):
        return f'<span class="status {esc(status)}">{esc(status)}</span> {reason}'
    return "–"


def _picture(version: str) -> str:
    return (
        f'<a href="{BASE}/versions/{esc(version)}/samples.png">'
        f'<img class="trigger" src="{BASE}/versions/{esc(version)}/samples.png" '
        f'alt="trigger pictures of {esc(version)}: clean | G(clean) | quarantined"></a>'
    )


def _repairs(view: Dashboard) -> str:
    rows = []
    for r in view.repairs:
        result = r.get("result_version")
        picture = _picture(str(result)) if result and r.get("status") == "published" else ""
        if not result and r.get("candidate_version"):
            result = f"{r['candidate_version']} (rejected candidate)"
        rows.append(
            f'<tr data-repair="{esc(r.get("id"))}"><td><code>{esc(r.get("id"))}</code><br>'
            f"<small>{_when(r.get('created'))}, by {esc(r.get('trigger'))}</small></td>"
            f"<td>{esc(r.get('version'))} → {esc(result or '–')}</td>"
            f'<td><span class="status {esc(r.get("status"))}">{esc(r.get("status"))}</span><br>'
            f"<small>{_progress(r)}</small></td>"
            f"<td>{esc(r.get('entries', r.get('pending_at_start')))}</td>"
            f"<td>GoodNet {_ca(r.get('holdout'), 'goodnet')}<br>"
            f"BadNet {_ca(r.get('holdout'), 'badnet')}</td>"
            f"<td>{_verdict(r)}</td><td>{picture}</td></tr>"
        )
    if not rows:
        empty = "<p>None yet.</p>"
        return f'<section class="panel" data-testid="repairs"><h2>Repairs</h2>{empty}</section>'
    return (
        '<section class="panel" data-testid="repairs"><h2>Repairs</h2><table><thead><tr>'
        "<th>repair</th><th>version → result</th><th>status / progress</th><th>inputs</th>"
        "<th>hold-out CA before → after</th><th>gate</th>"
        "<th>trigger pictures (clean | G(clean) | quarantined)</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _versions(view: Dashboard) -> str:
    rows = []
    for v in view.versions.get("versions") or []:
        version = str(v.get("version"))
        repair = v.get("repair")
        metrics = v.get("metrics") or {}
        ca = ", ".join(
            f"{esc(k)} {_percent(val)}" for k, val in metrics.items() if k.endswith("_ca")
        )
        override = v.get("override")
        if isinstance(override, dict):
            made = (
                f"override of rejected candidate {esc(override.get('of'))} by "
                f"{esc(override.get('by'))}: {esc(override.get('reason'))}"
            )
        elif repair:
            gate = "passed the gate" if repair.get("passed_gate") else "refused by the gate"
            made = f"repair of {esc(v.get('parent'))}: {gate}<br>{_picture(version)}"
        else:
            made = "pre-deployment" if not v.get("parent") else f"from {esc(v.get('parent'))}"
        if v.get("active"):
            action = '<span class="status published">active</span>'
        elif v.get("rejected_candidate"):  # never activated from here: only by an override
            action = '<span class="status gated">rejected candidate</span>'
        else:
            action = _form(f"{BASE}/versions/{version}/activate", "Activate", view.csrf)
        rows.append(
            f'<tr data-version="{esc(version)}"><td><strong>{esc(version)}</strong></td>'
            f"<td>{_when(v.get('created'))}</td><td>{made}</td><td>{ca or '–'}</td>"
            f"<td>{action}</td></tr>"
        )
    return (
        '<section class="panel" data-testid="versions"><h2>Versions</h2><table><thead><tr>'
        "<th>version</th><th>created</th><th>made by</th><th>hold-out CA</th><th></th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def dashboard_page(view: Dashboard) -> str:
    """The whole dashboard."""
    deployment = view.status.get("deployment", "")
    notice = f'<p class="notice" role="status">{esc(view.notice)}</p>' if view.notice else ""
    header = (
        f"<header><h1>NNoculation <small>deployment {esc(deployment)}</small></h1>"
        f"{_form(f'{BASE}/logout', 'Sign out', view.csrf, 'link')}</header>"
    )
    body = (
        f"{header}<main>{notice}{_summary(view)}{_current_repair(view)}{_gallery(view)}"
        f"{_repairs(view)}{_versions(view)}</main>"
    )
    in_flight = bool(view.status.get("current_repair"))
    return _page(f"NNoculation: {deployment}", body, refresh=in_flight)
