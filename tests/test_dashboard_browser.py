"""The quarantine dashboard (``/admin/ui``) in a real headless browser (Debian's chromium driven
by Playwright) against ``nnoculation serve`` and real Redis: it refuses without the token and
shows no data, signs in with it (a cookie that is not the token), shows the active version,
the quarantined inputs as pictures that load, a real repair's trigger pictures, and its
buttons activate, roll back and start a repair. Forms without the session's CSRF token are
refused over plain HTTP. Saves the screenshot of docs/operations.md."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from nnoculation.benchmarks.processes import wait_until
from service.ui import render, session
from tests.online import (
    ADMIN_TOKEN,
    DEFAULT_REDIS_URL,
    DEPLOYMENT,
    PNG_HEADERS,
    ApiServer,
    forget_prefix,
    new_prefix,
    online_env,
    poisoned_pngs,
    publish,
)
from worker.jobs import Context, execute
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
# `make docs-screenshots` sets this to docs/images to refresh the picture in docs/operations.md;
# otherwise the screenshot goes to the test's temp dir (a test run leaves the checkout clean).
SCREENSHOT_DIR_ENV = "NNOC_SCREENSHOT_DIR"
CHROMIUM = "/usr/bin/chromium"
UI = "/admin/ui"


@dataclass
class Deployed:
    api: ApiServer
    quarantined: int  # pending inputs of v0001 shown in the gallery


def served_version(api: ApiServer) -> str | None:
    with api.admin() as admin:
        return admin.get("/admin/status").json()["this_process"]["version"]  # type: ignore[no-any-return]


def quarantine(api: ApiServer, attack: Any, count: int, seed: int) -> int:
    """Send triggered inputs; how many the BadNet and the GoodNet disagreed on."""
    with api.admin() as admin:
        answers = [
            admin.post("/predict", content=data, headers=PNG_HEADERS).json()
            for data in poisoned_pngs(attack, count, seed=seed)
        ]
    return sum(a["quarantined"] for a in answers)


def repair_in_process(api: ApiServer, work: Path, prefix: str) -> str:
    """Start a repair through the admin API and run its job here (the real worker code with
    the fast ``mean-diff`` profile, a loosened gate): publishes, activates and announces v0002."""
    with api.admin() as admin:
        started = admin.post("/admin/repair")
    assert started.status_code == 202, started.text
    settings = WorkerSettings(
        redis_url=DEFAULT_REDIS_URL, key_prefix=prefix, deployment=DEPLOYMENT,
        store_root=work / "store", work_dir=work / "repairs", repair_profile="mean-diff",
        repair_options={"theta": 0.9, "finetune_epochs": 1}, repair_backoff_s=0,
    )  # fmt: skip
    result = execute(Context.from_settings(settings), started.json()["repair_id"], 1)
    assert result["status"] == "published", result
    return str(result["version"])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, tiny_deployment: Any) -> Iterator[Deployed]:
    """v0001 served with quarantined inputs pending, and v0002 made from earlier ones by a real
    repair (so the page has trigger pictures), then rolled back from."""
    work = tmp_path_factory.mktemp("dashboard")
    source, attack, _ = tiny_deployment
    publish(work / "store", source)
    prefix = new_prefix()
    env = online_env(work / "store", DEFAULT_REDIS_URL, prefix, work, quarantine_n=10_000)
    api = ApiServer(env, work / "api.log")
    try:
        api.wait_ready()
        assert quarantine(api, attack, 24, seed=51) >= 10
        assert repair_in_process(api, work, prefix) == "v0002"
        with api.admin() as admin:
            assert admin.post("/admin/rollback").json() == {"active": "v0001"}
        wait_until(lambda: served_version(api) == "v0001", 20, "the API to serve v0001 again")
        pending = quarantine(api, attack, 30, seed=52)
        assert pending >= 10, "the tiny BadNet and GoodNet should disagree on its trigger"
        yield Deployed(api, pending)
    finally:
        api.stop()
        forget_prefix(prefix)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def sign_in(page: Page, url: str, token: str) -> int:
    """Fill the login form; the status of the page it leads to."""
    page.goto(url + UI)
    page.fill("input[name=token]", token)
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    response = navigation.value
    assert response is not None
    return response.status


def repairs(api: ApiServer) -> list[dict[str, Any]]:
    with api.admin() as admin:
        return admin.get("/admin/repairs").json()["repairs"]  # type: ignore[no-any-return]


def test_without_the_token_the_page_shows_a_login_form_and_no_data(
    deployed: Deployed, browser: Browser
) -> None:
    api = deployed.api
    with api.admin() as admin:
        sha = admin.get("/admin/quarantine/samples").json()["items"][0]["sha256"]
    with api.client() as client:
        plain = client.get(UI)
        assert client.get(f"{UI}/quarantine/{sha}.png").status_code == 401
        assert client.get(f"{UI}/versions/v0002/samples.png").status_code == 401
    forged_cookie = {"nnoc_ui": f"9999999999.00.{'0' * 64}"}
    with api.client(cookies=forged_cookie) as client:
        forged = client.get(UI)
    with api.client(cookies={"nnoc_ui": ADMIN_TOKEN}) as client:
        raw = client.get(UI)
    with api.client() as client:
        bearer = client.get(UI, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert plain.status_code == forged.status_code == raw.status_code == 401
    assert bearer.status_code == 401  # the page takes its own session only
    assert 'name="token"' in plain.text and "v0001" not in plain.text and sha not in plain.text
    assert "script-src" not in plain.headers["content-security-policy"]  # default-src 'none'
    page = browser.new_page()
    try:
        response = page.goto(api.url + UI)
        assert response is not None and response.status == 401
        expect(page.locator("input[name=token]")).to_be_visible()
        assert page.locator("img").count() == 0
        assert sign_in(page, api.url, "not-the-token") == 401
        expect(page.locator(".error")).to_contain_text("not the admin token")
        assert page.context.cookies() == []
    finally:
        page.close()


def sign_in_over_http(client: httpx.Client) -> str:
    """Sign ``client`` in through the login form; the CSRF token of the page's forms."""
    signed_in = client.post(f"{UI}/login", data={"token": ADMIN_TOKEN})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == UI
    page = client.get(UI)
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert csrf is not None
    return csrf.group(1)


def test_forms_without_the_sessions_csrf_token_are_refused(deployed: Deployed) -> None:
    api = deployed.api
    before = repairs(api)
    with api.client(follow_redirects=False) as client:
        csrf = sign_in_over_http(client)
        for data in ({}, {"csrf": ""}, {"csrf": "0" * 64}):
            assert client.post(f"{UI}/repair", data=data).status_code == 403
            assert client.post(f"{UI}/versions/v0002/activate", data=data).status_code == 403
            assert client.post(f"{UI}/rollback", data=data).status_code == 403
    # The right CSRF token without the session (another site's form cannot read either).
    with api.client(follow_redirects=False) as stranger:
        refused = stranger.post(f"{UI}/repair", data={"csrf": csrf})
        assert refused.status_code == 401 and 'name="token"' in refused.text
    assert repairs(api) == before
    with api.admin() as admin:
        assert admin.get("/admin/versions").json()["active"] == "v0001"


def test_the_dashboard_shows_the_quarantine_and_its_buttons_act(
    deployed: Deployed, browser: Browser, tmp_path: Path
) -> None:
    api = deployed.api
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        assert sign_in(page, api.url, ADMIN_TOKEN) == 200
        cookie = next(c for c in context.cookies() if c["name"] == "nnoc_ui")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
        assert ADMIN_TOKEN not in cookie["value"]

        expect(page.get_by_test_id("active-version")).to_contain_text("v0001")
        gallery = page.get_by_test_id("gallery")
        samples = gallery.locator("figure.sample")
        expect(samples).to_have_count(deployed.quarantined)
        expect(samples.first).to_contain_text("BadNet:")
        expect(samples.first).to_contain_text("GoodNet:")
        versions = page.get_by_test_id("versions")
        expect(versions.locator("tr[data-version=v0002]")).to_contain_text("passed the gate")
        expect(page.get_by_test_id("repairs")).to_contain_text("published")
        widths = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.getAttribute('src')])"
        )
        assert len(widths) == deployed.quarantined + 2  # + the repair's pictures, twice
        assert all(complete and width > 0 for complete, width, _ in widths), widths

        with page.expect_navigation():
            versions.locator("tr[data-version=v0002] button", has_text="Activate").click()
        expect(page.locator(".notice")).to_contain_text("v0002 is now the active version")
        with api.admin() as admin:
            assert admin.get("/admin/versions").json()["active"] == "v0002"
        with page.expect_navigation():
            page.get_by_role("button", name="Roll back").click()
        expect(page.locator(".notice")).to_contain_text("v0001 is now the active version")
        expect(page.get_by_test_id("active-version")).to_contain_text("v0001")

        before = {r["id"] for r in repairs(api)}
        with page.expect_navigation():
            page.get_by_role("button", name="Repair now").click()
        started = [r for r in repairs(api) if r["id"] not in before]
        assert len(started) == 1 and started[0]["status"] == "queued", started
        assert started[0]["trigger"] == "admin" and started[0]["version"] == "v0001"
        expect(page.locator(".notice")).to_contain_text(started[0]["id"])
        expect(page.get_by_test_id("current-repair")).to_contain_text(started[0]["id"])
        expect(samples).to_have_count(deployed.quarantined)
        shots = Path(os.environ.get(SCREENSHOT_DIR_ENV) or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        png = page.screenshot(path=str(shots / "dashboard.png"), full_page=True)
        assert png.startswith(b"\x89PNG") and len(png) > 10_000

        with page.expect_navigation() as signed_out:
            page.get_by_role("button", name="Sign out").click()
        assert signed_out.value is not None and signed_out.value.status == 401
        assert [c for c in context.cookies() if c["name"] == "nnoc_ui"] == []
    finally:
        context.close()


def test_pictures_need_the_session(deployed: Deployed) -> None:
    api = deployed.api
    with api.client(follow_redirects=False) as client:
        client.post(f"{UI}/login", data={"token": ADMIN_TOKEN})
        image = client.get(f"{UI}/versions/v0002/samples.png")
        assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
        assert client.get(f"{UI}/versions/v0001/samples.png").status_code == 404
    with httpx.Client(base_url=api.url) as anonymous:
        assert anonymous.get(f"{UI}/dashboard.css").status_code == 200  # no data in it


def test_a_form_the_admin_api_refuses_shows_its_reason(deployed: Deployed) -> None:
    """The admin handler's error becomes a page with its status, both when it raises (an
    unknown version) and when it answers 409 itself (a repair already in flight)."""
    api = deployed.api
    with api.admin() as admin:
        assert admin.post("/admin/repair").status_code in (202, 409)  # one is in flight now
        active = admin.get("/admin/versions").json()["active"]
    in_flight = [r["id"] for r in repairs(api) if r["status"] in ("queued", "running")]
    assert len(in_flight) == 1, in_flight
    with api.client(follow_redirects=False) as client:
        csrf = sign_in_over_http(client)
        unknown = client.post(f"{UI}/versions/v0999/activate", data={"csrf": csrf})
        assert unknown.status_code == 404 and "Not done" in unknown.text
        assert "v0999" in unknown.text
        again = client.post(f"{UI}/repair", data={"csrf": csrf})
        assert again.status_code == 409 and "Not done" in again.text
        assert f"repair {in_flight[0]} is in flight" in again.text
    assert [r["id"] for r in repairs(api) if r["status"] in ("queued", "running")] == in_flight
    with api.admin() as admin:
        assert admin.get("/admin/versions").json()["active"] == active


HOSTILE = "<script>alert(1)</script>\"'><img src=x>"


def test_every_value_on_the_page_is_escaped() -> None:
    # Class names come from the (untrusted) model bundle, reasons from exceptions: nothing
    # outside the page's own markup may become markup.
    item = {"sha256": "a" * 64, "badnet_class": HOSTILE, "goodnet_class": HOSTILE,
            "count": HOSTILE}  # fmt: skip
    repair = {"id": HOSTILE, "version": HOSTILE, "status": "gated", "reason": HOSTILE,
              "trigger": HOSTILE, "stage": HOSTILE, "created": HOSTILE}  # fmt: skip
    view = render.Dashboard(
        status={"deployment": HOSTILE, "active_version": HOSTILE, "current_repair": HOSTILE,
                "processes": [{"pid": HOSTILE, "version": HOSTILE}], "n": HOSTILE,
                "quarantine": {"size": HOSTILE, "cap": HOSTILE, "overflow": HOSTILE,
                               "versions": {HOSTILE: {"pending": HOSTILE}}},
                "traffic": {"requests": HOSTILE, "disagreements": HOSTILE}},
        quarantine={"versions": {HOSTILE: {"badnet_classes": {HOSTILE: HOSTILE}}}},
        samples={"version": HOSTILE, "items": [item]},
        repairs=[repair],
        versions={"versions": [{"version": HOSTILE, "parent": HOSTILE, "created": HOSTILE,
                                "metrics": {f"{HOSTILE}_ca": HOSTILE}, "repair": {}}]},
        notice=HOSTILE, csrf=HOSTILE, sample_limit=60,
    )  # fmt: skip
    page = render.dashboard_page(view) + render.login_page(HOSTILE)
    page += render.message_page(HOSTILE, HOSTILE)
    assert "<script" not in page and "<img src=x" not in page and "\"'>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&gt;&lt;img src=x&gt;" in page


def test_sessions_expire_and_belong_to_their_token() -> None:
    cookie = session.new_session(ADMIN_TOKEN, now=1_000_000)
    assert session.session_valid(cookie, ADMIN_TOKEN, now=1_000_000 + 60)
    assert not session.session_valid(cookie, ADMIN_TOKEN, now=1_000_001 + session.SESSION_TTL_S)
    assert not session.session_valid(cookie, "another-token", now=1_000_060)
    issued, nonce, mac = cookie.split(".")
    assert not session.session_valid(f"{int(issued) + 1}.{nonce}.{mac}", ADMIN_TOKEN, now=1e6)
    csrf = session.csrf_token(cookie, ADMIN_TOKEN)
    assert session.csrf_valid(csrf, cookie, ADMIN_TOKEN)
    assert not session.csrf_valid(csrf, session.new_session(ADMIN_TOKEN), ADMIN_TOKEN)
