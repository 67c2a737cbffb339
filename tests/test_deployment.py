"""``load_deployment`` serves every on-disk form alike: a zoo deployment, a TorchScript one and
a ``torch.export`` one answer exactly as their nets do offline, through the library and through
the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from models.bundle import load_bundle, write_bundle
from models.nets import Net
from models.store import ModelStore, StoreUnavailableError
from nnoculation.deployment import load_deployment, resolve_device
from nnoculation.inputs import encode_png
from service.app import create_app
from service.settings import ServiceSettings
from tests.online import ADMIN_TOKEN, DEFAULT_REDIS_URL, DEPLOYMENT, new_prefix, publish

# Starlette asks for `httpx2` behind its TestClient; the client still works with httpx.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


def as_format(net: Net, fmt: str) -> Net:
    if fmt == "zoo":
        return net
    if fmt == "torchscript":
        return Net(torch.jit.script(net.module), "torchscript", net.spec, net.num_classes)
    return Net(net.module, "export", net.spec, net.num_classes)


def publish_as(store_root: Path, source: Path, fmt: str) -> tuple[Net, Net]:
    bundle = load_bundle(source)
    nets = {role: as_format(bundle.net(role), fmt) for role in ("badnet", "goodnet")}

    def build(directory: Path, version: str) -> Any:
        return write_bundle(
            directory, name="deployment", version=version, parent=None, spec=bundle.spec,
            class_names=bundle.class_names, nets=nets,
            tensors={"validation": bundle.tensors("validation")},
            metrics=bundle.manifest.metrics, provenance=bundle.manifest.provenance,
        )  # fmt: skip

    ModelStore(store_root).publish(DEPLOYMENT, build, activate=True)
    return nets["badnet"], nets["goodnet"]


@pytest.mark.parametrize("fmt", ["zoo", "torchscript", "export"])
def test_every_format_answers_as_offline(tmp_path: Path, tiny_deployment: Any, fmt: str) -> None:
    source, attack, test = tiny_deployment
    badnet, goodnet = publish_as(tmp_path / "store", source, fmt)
    loaded = load_deployment(ModelStore(tmp_path / "store"), DEPLOYMENT, device="cpu")
    assert loaded.badnet.format == fmt and loaded.version == "v0001"
    loaded.warm_up()
    images = torch.cat([test.images[:20], attack.triggers[0].apply(
        test.images[:20], torch.Generator().manual_seed(0))])  # fmt: skip
    out = loaded.classify(images)
    assert torch.equal(out.badnet_labels, badnet.predict(images))
    assert torch.equal(out.goodnet_labels, goodnet.predict(images))
    assert torch.equal(out.labels, out.goodnet_labels)  # sec. 3.3: the GoodNet's answer
    assert out.disagree.any(), "the trigger should split the two nets on some inputs"
    # And through the API.
    settings = ServiceSettings(
        redis_url=DEFAULT_REDIS_URL, key_prefix=new_prefix(), deployment=DEPLOYMENT,
        store_root=tmp_path / "store", spool_dir=tmp_path / "spool", workers=1,
    )  # fmt: skip
    from fastapi.testclient import TestClient  # imported here: it warns at import

    # Inputs the nets agree on and inputs they split on: the API serves the GoodNet's label.
    split = torch.nonzero(out.disagree).flatten()[:4]
    chosen = torch.cat([torch.nonzero(~out.disagree).flatten()[:2], split])
    with TestClient(create_app(settings)) as client:
        answers = [
            client.post("/predict", content=encode_png(img), headers={"content-type": "image/png"})
            for img in images[chosen]
        ]
    served = [a.json()["label"] for a in answers]
    assert served == out.goodnet_labels[chosen].tolist()
    assert all(s != b for s, b in zip(served[2:], out.badnet_labels[split].tolist(), strict=True))


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_an_unreachable_store_answers_503_not_404(
    tiny_deployment: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that does not answer (an s3:// bucket behind a broken network) is not a missing
    version: admin routes say 503 with Retry-After, and predictions go on from memory."""
    from fastapi.testclient import TestClient  # imported here: it warns at import

    source, _attack, test = tiny_deployment
    publish(tmp_path / "store", source)
    settings = ServiceSettings(
        redis_url=DEFAULT_REDIS_URL, key_prefix=new_prefix(), deployment=DEPLOYMENT,
        store_root=tmp_path / "store", spool_dir=tmp_path / "spool", workers=1,
        admin_token=ADMIN_TOKEN,
    )  # fmt: skip
    app = create_app(settings)

    def unreachable(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailableError("S3 get_object s3://bucket/tiny/...: connection refused")

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app) as client:
        store = app.state.runtime.store
        for name in ("manifest", "versions", "activate", "read_file"):
            monkeypatch.setattr(store, name, unreachable)
        answers = [
            client.get("/admin/versions/v0001", headers=headers),
            client.get("/admin/versions", headers=headers),
            client.post("/admin/versions/v0001/activate", headers=headers),
            client.get("/admin/versions/v0001/samples.png", headers=headers),
        ]
        predicted = client.post(
            "/predict", content=encode_png(test.images[0]), headers={"content-type": "image/png"}
        )
    assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]
    assert all(a.headers["retry-after"] == "5" for a in answers)
    assert "model store is unavailable" in answers[0].json()["detail"]
    assert predicted.status_code == 200
