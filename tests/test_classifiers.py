"""Contract tests over every registered architecture of the classifier zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.classifiers import (
    ARCH_KWARGS_SCHEMAS,
    ARCHITECTURES,
    ArchKwargsError,
    build_classifier,
    validate_arch_kwargs,
)
from models.spec import InputSpec

SPECS = {
    "grey28": InputSpec(1, 28, 28),
    "colour32": InputSpec(3, 32, 32, (0.5,), (0.25,)),
    "face55x47": InputSpec(3, 55, 47),
}
# ResNet-18 on 55x47 adds seconds and nothing the 32x32 case does not cover; deepid refuses
# inputs too small for its four conv stages by design.
SLOW = {("resnet18", "face55x47")}
CASES = [(a, s) for a in ARCHITECTURES.names() for s in sorted(SPECS) if (a, s) not in SLOW]
TOO_SMALL = {("deepid", "grey28")}
NUM_CLASSES = 5
BATCH = 2


@pytest.mark.parametrize(("arch", "spec_name"), CASES)
def test_forward_shape_and_gradients(arch: str, spec_name: str) -> None:
    spec = SPECS[spec_name]
    if (arch, spec_name) in TOO_SMALL:
        with pytest.raises(ValueError, match="too small"):
            build_classifier(arch, spec, NUM_CLASSES)
        return
    torch.manual_seed(0)
    net = build_classifier(arch, spec, NUM_CLASSES)
    assert isinstance(net, nn.Module)
    logits = net(torch.randn(BATCH, *spec.shape))
    assert logits.shape == (BATCH, NUM_CLASSES)
    nn.functional.cross_entropy(logits, torch.arange(BATCH)).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(KeyError, match="small_cnn"):
        build_classifier("no_such_net", SPECS["grey28"], NUM_CLASSES)


def test_unknown_kwarg_is_refused() -> None:
    with pytest.raises(ArchKwargsError, match="'deepid' takes no keyword argument 'width'"):
        build_classifier("deepid", SPECS["face55x47"], NUM_CLASSES, width=3)
    with pytest.raises(ArchKwargsError, match=r"'widht'; allowed: width \(int in \[1, 512\]"):
        build_classifier("small_cnn", SPECS["grey28"], NUM_CLASSES, widht=3)


@pytest.mark.parametrize(
    ("arch", "kwargs", "problem"),
    [
        ("small_cnn", {"width": 10**9}, "less than or equal to 512"),
        ("small_cnn", {"width": 0}, "greater than or equal to 1"),
        ("small_cnn", {"width": -4}, "greater than or equal to 1"),
        ("small_cnn", {"width": True}, "valid integer"),
        ("small_cnn", {"width": "16"}, "valid integer"),
        ("small_cnn", {"dropout": 1.5}, "less than or equal to 0.95"),
        ("small_cnn", {"dropout": float("nan")}, "finite number"),
        ("cifar_cnn", {"width": 4096}, "less than or equal to 256"),
    ],
)
def test_absurd_kwargs_are_refused_before_building(
    arch: str, kwargs: dict[str, object], problem: str
) -> None:
    with pytest.raises(ArchKwargsError, match=problem):
        validate_arch_kwargs(arch, kwargs)
    with pytest.raises(ArchKwargsError):
        build_classifier(arch, SPECS["colour32"], NUM_CLASSES, **kwargs)


def test_every_architecture_declares_its_kwargs() -> None:
    assert set(ARCH_KWARGS_SCHEMAS) == set(ARCHITECTURES.names())
    assert validate_arch_kwargs("small_cnn", {"width": 8, "dropout": 0}) == {
        "width": 8,
        "dropout": 0,
    }
    assert validate_arch_kwargs("resnet18", None) == {}
    with pytest.raises(ArchKwargsError, match="JSON object"):
        validate_arch_kwargs("small_cnn", [8])  # type: ignore[arg-type]


def test_small_cnn_kwargs_and_small_inputs() -> None:
    net = build_classifier("small_cnn", InputSpec(1, 8, 8), 10, width=8, dropout=0.25)
    assert net(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.25]
    with pytest.raises(ValueError, match="too small"):
        build_classifier("small_cnn", InputSpec(1, 2, 2), 10)


def test_deepid_has_the_reference_sizes() -> None:
    # Fine-Pruning / NNoculation YouTube Face net: pool3 5x4x60, conv4 4x3x80, 1283 classes.
    net = build_classifier("deepid", InputSpec(3, 55, 47), 1283)
    assert net.fc_pool3.in_features == 5 * 4 * 60
    assert net.fc_conv4.in_features == 4 * 3 * 80
    assert net.classifier.out_features == 1283


def test_resnet18_is_adapted_to_small_inputs() -> None:
    net = build_classifier("resnet18", SPECS["grey28"], NUM_CLASSES)
    assert net.conv1.in_channels == 1
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)


def test_cifar_cnn_uses_batchnorm() -> None:
    net = build_classifier("cifar_cnn", SPECS["colour32"], NUM_CLASSES)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 6
