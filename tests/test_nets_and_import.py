"""Net save/load/clone in every format, and the import of untrusted model files."""

from __future__ import annotations

import json
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from models.classifiers import build_classifier
from models.importing import UnsafeModelError, import_net, import_net_bytes
from models.nets import Net
from models.spec import InputSpec

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")

SPEC = InputSpec(1, 28, 28, (0.5,), (0.5,))
NUM_CLASSES = 10
ARCH_KWARGS = {"width": 4}


def zoo_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    module = build_classifier("small_cnn", SPEC, NUM_CLASSES, **ARCH_KWARGS).eval()
    return Net(module, "zoo", SPEC, NUM_CLASSES, arch="small_cnn", arch_kwargs=dict(ARCH_KWARGS))


def images(n: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, *SPEC.shape), dtype=torch.uint8, generator=generator)


def scripted(net: Net) -> Net:
    return Net(torch.jit.script(net.module), "torchscript", SPEC, NUM_CLASSES)


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported program, shared: ``torch.export`` is the slow part of these tests."""
    directory = tmp_path_factory.mktemp("export")
    return Net(zoo_net().module, "export", SPEC, NUM_CLASSES).save(directory, "badnet")[0]


class TouchOnUnpickle:
    """A pickle payload: unpickling it creates ``marker`` (a stand-in for running any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


class ReadsAFile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] + torch.from_file("/etc/hostname", size=1).float()


# --- Net ---


def test_zoo_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    net = zoo_net()
    (path,) = net.save(tmp_path, "badnet")
    assert path.name == "badnet.safetensors"
    entry = net.manifest_entry(path.name)
    assert entry == {
        "format": "zoo",
        "file": "badnet.safetensors",
        "arch": "small_cnn",
        "arch_kwargs": ARCH_KWARGS,
    }
    loaded = Net.load(tmp_path, json.loads(json.dumps(entry)), SPEC, NUM_CLASSES)
    assert torch.equal(loaded.logits(images()), net.logits(images()))
    assert not loaded.module.training


def test_torchscript_round_trip(tmp_path: Path) -> None:
    net = scripted(zoo_net())
    (path,) = net.save(tmp_path, "goodnet")
    assert path.name == "goodnet.torchscript.pt"
    loaded = Net.load(tmp_path, net.manifest_entry(path.name), SPEC, NUM_CLASSES)
    assert loaded.format == "torchscript"
    assert torch.equal(loaded.logits(images()), net.logits(images()))


def test_export_round_trip_keeps_a_dynamic_batch(exported_file: Path) -> None:
    entry = {"format": "export", "file": exported_file.name, "arch": None, "arch_kwargs": {}}
    loaded = Net.load(exported_file.parent, entry, SPEC, NUM_CLASSES)
    reference = zoo_net()
    for n in (1, 5):
        assert torch.allclose(loaded.logits(images(n)), reference.logits(images(n)), atol=1e-5)
    loaded.train_mode(True)  # predict() answers in eval mode whatever the net's mode
    assert torch.equal(loaded.predict(images()), reference.predict(images()))
    resaved = loaded.save(exported_file.parent, "resaved")[0]
    again = Net.load(exported_file.parent, {**entry, "file": resaved.name}, SPEC, NUM_CLASSES)
    assert torch.allclose(again.logits(images()), loaded.logits(images()))


def test_clone_is_independent() -> None:
    for net in (zoo_net(), scripted(zoo_net())):
        copy = net.clone()
        assert copy.format == net.format
        assert torch.equal(copy.logits(images()), net.logits(images()))
        with torch.no_grad():
            for parameter in copy.module.parameters():
                parameter.add_(1.0)
        assert not torch.equal(copy.logits(images()), net.logits(images()))


def test_predict_batches_and_restores_mode() -> None:
    net = zoo_net().train_mode(True)
    labels = net.predict(images(5), batch_size=2)
    assert labels.dtype == torch.long and labels.shape == (5,)
    assert net.module.training
    assert torch.equal(labels, net.train_mode(False).logits(images(5)).argmax(1))
    assert net.predict(images(0)).shape == (0,)


def test_logits_refuse_images_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="expected images of shape"):
        zoo_net().logits(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


# --- import of untrusted files ---


def test_import_safetensors(tmp_path: Path) -> None:
    net = zoo_net()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(net.module.state_dict(), str(path))
    imported = import_net(path, SPEC, NUM_CLASSES, arch="small_cnn", arch_kwargs=ARCH_KWARGS)
    assert imported.format == "zoo" and imported.arch == "small_cnn"
    assert torch.equal(imported.logits(images()), net.logits(images()))
    with pytest.raises(ValueError, match="arch="):
        import_net(path, SPEC, NUM_CLASSES)


@pytest.mark.parametrize("wrapped", [False, True])
def test_import_state_dict(tmp_path: Path, wrapped: bool) -> None:
    net = zoo_net()
    state = net.module.state_dict()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": state, "epoch": 3} if wrapped else state, path)
    imported = import_net(path, SPEC, NUM_CLASSES, arch="small_cnn", arch_kwargs=ARCH_KWARGS)
    assert torch.equal(imported.logits(images()), net.logits(images()))


def test_import_torchscript(tmp_path: Path) -> None:
    net = scripted(zoo_net())
    path = tmp_path / "badnet.pt"
    torch.jit.save(net.module, str(path))
    imported = import_net(path, SPEC, NUM_CLASSES)
    assert imported.format == "torchscript"
    assert torch.equal(imported.logits(images()), net.logits(images()))


def test_import_exported_program(exported_file: Path) -> None:
    imported = import_net(exported_file, SPEC, NUM_CLASSES)
    assert imported.format == "export"
    assert torch.allclose(imported.logits(images()), zoo_net().logits(images()), atol=1e-5)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "badnet.pt"
    torch.save(TouchOnUnpickle(marker), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeModelError, match=r"pickled objects other than tensors.*safetensors"):
        import_net(path, SPEC, NUM_CLASSES, arch="small_cnn")
    assert not marker.exists()


def test_plain_pickle_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "badnet.pkl"
    path.write_bytes(pickle.dumps({"weight": TouchOnUnpickle(marker)}, protocol=2))
    with pytest.raises(UnsafeModelError):
        import_net(path, SPEC, NUM_CLASSES, arch="small_cnn")
    assert not marker.exists()


def test_wrong_architecture_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(zoo_net().module.state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit architecture 'cifar_cnn'"):
        import_net(path, SPEC, NUM_CLASSES, arch="cifar_cnn")


def test_wrong_number_of_classes_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "badnet.pt"
    torch.jit.save(scripted(zoo_net()).module, str(path))
    with pytest.raises(ValueError, match=r"returns \[2, 10\].*expected logits \[2, 7\]"):
        import_net(path, SPEC, 7)


def test_torchscript_reading_files_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reader.pt"
    torch.jit.save(torch.jit.script(ReadsAFile()), str(path))
    with pytest.raises(UnsafeModelError, match="from_file"):
        import_net(path, SPEC, NUM_CLASSES)


def rewrite_pt2(
    source: Path, target: Path, edit: Callable[[str, bytes], bytes], extra: dict[str, bytes]
) -> Path:
    """Copy a .pt2 archive, passing every member through ``edit`` and adding ``extra``."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))
        for name, data in extra.items():
            zout.writestr(f"{root}/{name}", data)
    return target


def edit_program(change: Callable[[dict[str, Any]], None]) -> Callable[[str, bytes], bytes]:
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        change(program)
        return json.dumps(program).encode()

    return edit


def inject_guard(marker: Path) -> Callable[[dict[str, Any]], None]:
    def change(program: dict[str, Any]) -> None:
        program["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch() is None"]

    return change


def inject_shape_expression(marker: Path) -> Callable[[dict[str, Any]], None]:
    def change(program: dict[str, Any]) -> None:
        for value in program["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    expr = size["as_expr"]["expr_str"]
                    size["as_expr"]["expr_str"] = (
                        f"__import__('pathlib').Path('{marker}').touch() or {expr}"
                    )

    return change


def call_os_system(program: dict[str, Any]) -> None:
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


def pickled_weights(name: str, data: bytes) -> bytes:
    if not name.endswith("_weights_config.json"):
        return data
    config = json.loads(data)
    next(iter(config["config"].values()))["use_pickle"] = True
    return json.dumps(config).encode()


@pytest.mark.parametrize(
    "case", ["guard_code", "shape_expression", "graph_target", "pickled_weights", "aoti_library"]
)
def test_malicious_exported_program_is_refused(
    exported_file: Path, tmp_path: Path, case: str
) -> None:
    # Each of these runs attacker code (or unpickles) inside a plain torch.export.load in 2.14.
    marker = tmp_path / "pwned"
    edits = {
        "guard_code": edit_program(inject_guard(marker)),
        "shape_expression": edit_program(inject_shape_expression(marker)),
        "graph_target": edit_program(call_os_system),
        "pickled_weights": pickled_weights,
    }
    extra = {"data/aotinductor/model/model.so": b"\x7fELF"} if case == "aoti_library" else {}
    path = rewrite_pt2(
        exported_file, tmp_path / "evil.pt2", edits.get(case, lambda _n, d: d), extra
    )
    with pytest.raises(UnsafeModelError, match="refused"):
        import_net(path, SPEC, NUM_CLASSES)
    assert not marker.exists()
    # Net.load, the loader of bundle files, takes the same checks.
    entry = {"format": "export", "file": path.name, "arch": None, "arch_kwargs": {}}
    with pytest.raises(UnsafeModelError, match="refused"):
        Net.load(path.parent, entry, SPEC, NUM_CLASSES)
    assert not marker.exists()


def test_net_load_refuses_torchscript_that_reads_files(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(ReadsAFile()), str(tmp_path / "badnet.torchscript.pt"))
    entry = {"format": "torchscript", "file": "badnet.torchscript.pt"}
    with pytest.raises(UnsafeModelError, match="from_file"):
        Net.load(tmp_path, entry, SPEC, NUM_CLASSES)


def test_net_load_refuses_a_format_other_than_declared(tmp_path: Path) -> None:
    (path,) = scripted(zoo_net()).save(tmp_path, "badnet")
    entry = {"format": "export", "file": path.name}
    with pytest.raises(ValueError, match="declared as a export net but holds a torchscript"):
        Net.load(tmp_path, entry, SPEC, NUM_CLASSES)


def test_net_load_checks_zoo_kwargs(tmp_path: Path) -> None:
    (path,) = zoo_net().save(tmp_path, "badnet")
    entry = {"format": "zoo", "file": path.name, "arch": "small_cnn", "arch_kwargs": {"w": 4}}
    with pytest.raises(ValueError, match="allowed: width"):
        Net.load(tmp_path, entry, SPEC, NUM_CLASSES)


def test_import_net_bytes_matches_import_net(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(zoo_net().module.state_dict(), str(path))
    data = path.read_bytes()
    path.unlink()  # the bytes are all it needs
    net = import_net_bytes(data, "bad.safetensors", SPEC, NUM_CLASSES, "small_cnn", ARCH_KWARGS)
    assert torch.equal(net.logits(images()), zoo_net().logits(images()))
    scripted_path = tmp_path / "bad.pt"
    torch.jit.save(scripted(zoo_net()).module, str(scripted_path))
    net = import_net_bytes(scripted_path.read_bytes(), "upload", SPEC, NUM_CLASSES)
    assert net.format == "torchscript"
    with pytest.raises(ValueError, match=r"width.*less than or equal to 512"):
        import_net_bytes(data, "bad.safetensors", SPEC, NUM_CLASSES, "small_cnn", {"width": 10**9})
