"""The API over real HTTP (``nnoculation serve``, uvicorn, real Redis): malformed uploads of
many kinds each get a clear 4xx and never a 5xx, admin routes refuse callers without the
token, only admins learn what was quarantined, and schemathesis finds no 5xx and no response
that breaks the served OpenAPI schema."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.online import (
    ADMIN_TOKEN,
    DEFAULT_REDIS_URL,
    PNG_HEADERS,
    ApiServer,
    clean_pngs,
    new_prefix,
    online_env,
    poisoned_pngs,
    publish,
)

MAX_BODY = 64 * 1024
ST_CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_deployment: Any) -> Iterator[ApiServer]:
    work = tmp_path_factory.mktemp("http")
    source, _, _ = tiny_deployment
    publish(work / "store", source)
    env = online_env(work / "store", DEFAULT_REDIS_URL, new_prefix(), work,
                     max_body_bytes=MAX_BODY, quarantine_n=10_000)  # fmt: skip
    api = ApiServer(env, work / "api.log")
    try:
        api.wait_ready()
        yield api
    finally:
        api.stop()


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gif() -> bytes:
    frames = [Image.new("L", (12, 12), v) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def palette() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (12, 12), 1).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb() -> bytes:
    import zlib

    data = bytearray(encode(np.zeros((1, 1), np.uint8)))
    data[16:24] = (50000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


GOOD = encode(np.zeros((12, 12), np.uint8))
PNG = PNG_HEADERS
# name -> (request kwargs for httpx, expected status)
MALFORMED: dict[str, tuple[dict[str, Any], int]] = {
    "truncated png": ({"content": GOOD[:30], "headers": PNG}, 422),
    "wrong magic": ({"content": b"\x00\x01\x02\x03" * 16, "headers": PNG}, 415),
    "png magic, garbage": ({"content": b"\x89PNG\r\n\x1a\n" + b"x" * 40, "headers": PNG}, 422),
    "zero bytes": ({"content": b"", "headers": PNG}, 422),
    "decompression bomb": ({"content": bomb(), "headers": PNG}, 422),
    "huge dimensions": ({"content": encode(np.zeros((1200, 1200), np.uint8)), "headers": PNG},
                        422),
    "body over the limit": ({"content": b"\x89PNG" + b"0" * (MAX_BODY + 1), "headers": PNG}, 413),
    "wrong content type": ({"content": GOOD, "headers": {"content-type": "text/plain"}}, 415),
    "json body": ({"json": {"image": "abc"}}, 415),
    "multipart without a file": ({"data": {"note": "hello"}, "files": {"other": ("x", b"1")}},
                                 422),
    "multipart field not a file": ({"data": {"file": "not a file"}, "files": {"x": ("x", b"1")}},
                                   422),
    "two files": ({"files": [("file", ("a.png", GOOD)), ("file", ("b.png", GOOD))]}, 422),
    "rgba": ({"content": encode(np.zeros((12, 12, 4), np.uint8)), "headers": PNG}, 422),
    "16-bit": ({"content": encode(np.full((12, 12), 40000, np.uint16)), "headers": PNG}, 422),
    "palette": ({"content": palette(), "headers": PNG}, 422),
    "animated gif": ({"content": gif(), "headers": {"content-type": "image/gif"}}, 415),
    "animated gif as png": ({"content": gif(), "headers": PNG}, 415),
    "text as octet-stream": ({"content": b"just some text",
                              "headers": {"content-type": "application/octet-stream"}}, 415),
    "broken multipart": ({"content": b"--x\r\nnonsense",
                          "headers": {"content-type": "multipart/form-data; boundary=y"}}, 400),
}  # fmt: skip


def test_at_least_twelve_kinds_of_malformed_upload() -> None:
    assert len(MALFORMED) >= 12


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_upload_gets_a_clear_4xx(server: ApiServer, name: str) -> None:
    kwargs, status = MALFORMED[name]
    with server.client() as client:
        response = client.post("/predict", **kwargs)
    assert response.status_code == status, (name, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and len(detail) > 10 and "Traceback" not in detail
    assert response.headers.get("x-request-id")


def test_a_body_without_length_is_cut_at_the_limit(server: ApiServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"\x89PNG" + b"0" * 8192

    with server.client() as client:
        response = client.post("/predict", content=chunks(), headers=PNG)
    assert response.status_code == 413


def test_good_uploads_all_ways(server: ApiServer) -> None:
    with server.client() as client:
        raw = client.post("/predict", content=GOOD, headers=PNG)
        form = client.post("/predict", files={"file": ("x.png", GOOD, "image/png")})
        octet = client.post(
            "/predict", content=encode(np.zeros((12, 12), np.uint8), "BMP"),
            headers={"content-type": "application/octet-stream"},
        )  # fmt: skip
        jpeg = client.post("/predict", content=encode(np.zeros((30, 30), np.uint8), "JPEG"),
                           headers={"content-type": "image/jpeg"})  # fmt: skip
    for response in (raw, form, octet, jpeg):
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"label", "class_name", "model_version", "request_id"}
        assert body["model_version"] == "v0001"
        assert body["request_id"] == response.headers["x-request-id"]


def test_batch_answers_each_item_on_its_own(server: ApiServer) -> None:
    """Each item gets its own answer (the one /predict gives that image), a bad item its own
    error, in upload order."""
    pngs = clean_pngs(12, seed=2)
    files = [("files", (f"{i}.png", data)) for i, data in enumerate(pngs)]
    files.insert(1, ("files", ("bad.txt", b"not an image")))
    with server.client() as client:
        response = client.post("/predict/batch", files=files)
        alone = [client.post("/predict", content=p, headers=PNG).json()["label"] for p in pngs]
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 415] + [200] * 11
    assert results[1]["error"] and results[1]["filename"] == "bad.txt"
    good = [r for r in results if r["status"] == 200]
    assert [r["prediction"]["label"] for r in good] == alone
    assert len(set(alone)) > 1, "the images should not all get one label"


def test_only_admins_learn_what_was_quarantined(server: ApiServer, tiny_deployment: Any) -> None:
    _, attack, _ = tiny_deployment
    poisoned = poisoned_pngs(attack, 20, seed=31)
    with server.client() as anonymous, server.admin() as admin:
        public = [anonymous.post("/predict", content=p, headers=PNG).json() for p in poisoned]
        private = [admin.post("/predict", content=p, headers=PNG).json() for p in poisoned]
        samples = admin.get("/admin/quarantine/samples", params={"limit": 100}).json()
    assert all("quarantined" not in body for body in public)
    flags = [body["quarantined"] for body in private]
    assert sum(flags) >= 10, "the tiny BadNet and GoodNet should disagree on its trigger"
    assert [b["label"] for b in public] == [b["label"] for b in private]
    assert len(samples["items"]) >= sum(flags)
    with server.admin() as admin:
        png = admin.get(samples["items"][0]["image"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def admin_operations(server: ApiServer) -> list[tuple[str, str]]:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    return [
        (method.upper(), path.replace("{version}", "v0001").replace("{repair_id}", "r1")
         .replace("{sha256}", "0" * 64))
        for path, methods in schema["paths"].items() if path.startswith("/admin")
        for method in methods
    ]  # fmt: skip


def test_every_admin_route_needs_the_token(server: ApiServer) -> None:
    operations = admin_operations(server)
    assert len(operations) >= 14
    for method, path in operations:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN}):
            response = httpx.request(method, server.url + path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers.get("www-authenticate") == "Bearer"


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples with ``labels`` (over processes) in a /metrics page."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_count_what_happened(server: ApiServer) -> None:
    """One good and one empty upload move each counter by exactly one."""
    rejected = {"outcome": "rejected", "version": "v0001"}
    answered = {"outcome": "agree", "version": "v0001"}
    status_422 = {"method": "POST", "route": "/predict", "status": "422"}
    with server.client() as client:
        before = client.get("/metrics").text
        assert client.post("/predict", content=GOOD, headers=PNG).status_code == 200
        assert client.post("/predict", content=b"", headers=PNG).status_code == 422
        text = client.get("/metrics").text

    def moved(name: str, **labels: str) -> float:
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert moved("nnoc_predictions_total", **rejected) == 1
    assert moved("nnoc_http_requests_total", **status_422) == 1
    assert moved("nnoc_inference_duration_seconds_count") == 1  # one batch of one input
    assert (
        moved("nnoc_predictions_total", **answered)
        + moved("nnoc_predictions_total", outcome="quarantined", version="v0001")
        == 1
    )
    # Per process (multiprocess mode adds the pid).
    assert re.search(r'nnoc_active_version_info\{pid="\d+",version="v0001"\} 1\.0', text)


def test_disconnecting_clients_do_not_stall_the_server(server: ApiServer) -> None:
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    request = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(GOOD)}\r\n\r\n"
    ).encode()
    for _ in range(20):  # send a request, hang up before the answer
        with socket.create_connection((host, port)) as s:
            s.sendall(request + GOOD)
    for _ in range(10):  # send half a body, hang up
        with socket.create_connection((host, port)) as s:
            s.sendall(request + GOOD[:10])
    with server.client() as client:
        answers = [client.post("/predict", content=GOOD, headers=PNG) for _ in range(20)]
    assert [a.status_code for a in answers] == [200] * 20


def test_admin_versions_purge_and_repair(server: ApiServer, tiny_deployment: Any) -> None:
    _, attack, _ = tiny_deployment
    with server.admin() as admin, server.client() as client:
        for data in poisoned_pngs(attack, 10, seed=81):
            client.post("/predict", content=data, headers=PNG)
        versions = admin.get("/admin/versions").json()
        assert versions["active"] == "v0001" and versions["versions"][0]["active"]
        assert admin.get("/admin/versions/v0001").json()["version"] == "v0001"
        assert admin.get("/admin/versions/v0009").status_code == 404
        assert admin.get("/admin/versions/v0001/samples.png").status_code == 404  # not a repair
        assert admin.delete("/admin/versions/v0001").status_code == 409  # the active one
        assert admin.post("/admin/rollback").status_code == 404  # nothing before v0001
        assert admin.post("/admin/versions/v0001/activate").json() == {"active": "v0001"}
        stats = admin.get("/admin/quarantine").json()
        pending = stats["versions"]["v0001"]["pending"]
        assert pending > 0 and stats["versions"]["v0001"]["badnet_classes"]
        started = admin.post("/admin/repair")
        assert started.status_code == 202 and started.json()["started"]
        rid = started.json()["repair_id"]
        again = admin.post("/admin/repair")
        assert again.status_code == 409 and again.json()["repair_id"] == rid
        record = admin.get(f"/admin/repairs/{rid}").json()
        assert record["status"] == "queued" and record["trigger"] == "admin"
        assert admin.post(f"/admin/repairs/{rid}/cancel").json()["status"] == "cancel_requested"
        assert admin.get("/admin/repairs/nope").status_code == 404
        purged = admin.post("/admin/quarantine/purge", params={"version": "v0001"}).json()
        archive = admin.get(f"/admin/quarantine/archives/{purged['purge_id']}").json()
        assert purged["archived"] == len(archive["items"]) == pending
        assert admin.get("/admin/quarantine").json()["versions"] == {}
        listed = admin.get("/admin/quarantine/archives").json()["archives"]
        assert purged["purge_id"] in [a["id"] for a in listed]


def test_schemathesis_finds_no_server_error(server: ApiServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"), "--config-file", str(ST_CONFIG),
            "run", f"{server.url}/openapi.json",
            "-H", f"Authorization: Bearer {ADMIN_TOKEN}", "--max-examples", "25",
            "--seed", "1", "--no-color", "--workers", "1", "--generation-database", "none",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
