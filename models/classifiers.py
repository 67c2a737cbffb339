"""The classifier zoo: architectures a BadNet or GoodNet can be built from by name.

Every entry is a factory ``(spec, num_classes, **kwargs) -> nn.Module``. The module takes the
*normalised* float input ``[N, C, H, W]`` (see :meth:`InputSpec.to_model_input`) and returns
logits ``[N, num_classes]``. Layer sizes are computed from the spec, so one entry serves
Fashion-MNIST, CIFAR-10 and YouTube Face alike; a spec too small for an architecture is refused
at construction with a readable message rather than failing inside a forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from models.registry import Registry
from models.spec import InputSpec

# small_cnn: the two-conv MNIST-style net of the BadNets/Fine-Pruning experiments.
SMALL_CNN_WIDTH = 32
SMALL_CNN_HIDDEN = 128
SMALL_CNN_POOLS = 2

# cifar_cnn: VGG-style, three blocks of two 3x3 convs (64, 128, 256 channels).
CIFAR_CNN_WIDTH = 64
CIFAR_CNN_HIDDEN = 256
CIFAR_CNN_BLOCKS = 3
CIFAR_CNN_CONVS_PER_BLOCK = 2

# deepid: the YouTube Face net of the Fine-Pruning / NNoculation reference code (55x47x3 input).
DEEPID_CHANNELS = (20, 40, 60, 80)
DEEPID_KERNELS = (4, 3, 3, 2)
DEEPID_HIDDEN = 160

# resnet18 adapted to small images: 3x3 stem, stride 1, no max-pool.
RESNET_STEM_CHANNELS = 64

KERNEL_3X3 = 3
POOL = 2

# Bounds on architecture kwargs. A manifest or a command line may come from anyone, and a width
# of 10**9 would try to allocate terabytes before anything could refuse it. The bounds leave
# room far beyond the defaults (small_cnn 32, cifar_cnn 64) and still build in seconds.
MAX_SMALL_CNN_WIDTH = 512
MAX_CIFAR_CNN_WIDTH = 256
MAX_DROPOUT = 0.95


class ClassifierFactory(Protocol):
    """Builds a classifier for ``spec`` with ``num_classes`` outputs."""

    def __call__(self, spec: InputSpec, num_classes: int, **kwargs: Any) -> nn.Module: ...


ARCHITECTURES: Registry[ClassifierFactory] = Registry("architecture")


class ArchKwargsError(ValueError):
    """Keyword arguments an architecture does not take, or values outside its bounds."""


class _Kwargs(BaseModel):
    """Base of the per-architecture kwargs schemas: unknown keys and coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoKwargs(_Kwargs):
    """An architecture that takes no keyword arguments."""


class WidthDropoutKwargs(_Kwargs):
    width: int = Field(SMALL_CNN_WIDTH, ge=1, le=MAX_SMALL_CNN_WIDTH)
    dropout: float = Field(0.0, ge=0.0, le=MAX_DROPOUT, allow_inf_nan=False)


class CifarCNNKwargs(_Kwargs):
    width: int = Field(CIFAR_CNN_WIDTH, ge=1, le=MAX_CIFAR_CNN_WIDTH)
    dropout: float = Field(0.0, ge=0.0, le=MAX_DROPOUT, allow_inf_nan=False)


# What each architecture's factory accepts; filled by :func:`_architecture` beside the registry.
ARCH_KWARGS_SCHEMAS: dict[str, type[_Kwargs]] = {}


def _architecture(name: str, kwargs_schema: type[_Kwargs]) -> Any:
    """Register a factory under ``name`` together with the schema of its keyword arguments."""
    register = ARCHITECTURES.register(name)

    def decorate(factory: ClassifierFactory) -> ClassifierFactory:
        ARCH_KWARGS_SCHEMAS[name] = kwargs_schema
        return register(factory)

    return decorate


def allowed_arch_kwargs(arch: str) -> dict[str, str]:
    """The keyword arguments ``arch`` takes, each described in words, e.g.
    ``{"width": "int in [1, 512], default 32"}``."""
    ARCHITECTURES.get(arch)  # KeyError listing the known names
    out = {}
    for key, info in ARCH_KWARGS_SCHEMAS[arch].model_fields.items():
        low = high = None
        for meta in info.metadata:
            if getattr(meta, "ge", None) is not None:
                low = f"[{meta.ge}"
            if getattr(meta, "gt", None) is not None:
                low = f"({meta.gt}"
            if getattr(meta, "le", None) is not None:
                high = f"{meta.le}]"
            if getattr(meta, "lt", None) is not None:
                high = f"{meta.lt})"
        kind = getattr(info.annotation, "__name__", str(info.annotation))
        bounds = f" in {low or '(-inf'}, {high or 'inf)'}" if low or high else ""
        out[key] = f"{kind}{bounds}, default {info.default}"
    return out


def validate_arch_kwargs(arch: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``kwargs`` against what ``arch`` takes; returns them as a plain dict.

    ``KeyError`` for an unknown architecture (listing the known ones); :class:`ArchKwargsError`
    naming the allowed keys for an unknown key, and the bounds for a value outside them. Serves
    bundle manifests, :func:`build_classifier` and the command line's ``--arch-kwargs``.
    """
    ARCHITECTURES.get(arch)
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ArchKwargsError(
            f"keyword arguments of architecture {arch!r} must be a mapping (a JSON object), "
            f"got {type(kwargs).__name__}"
        )
    allowed = allowed_arch_kwargs(arch)
    listing = "; ".join(f"{k} ({v})" for k, v in allowed.items()) or "none"
    unknown = sorted(str(k) for k in kwargs if k not in allowed)
    if unknown:
        raise ArchKwargsError(
            f"architecture {arch!r} takes no keyword argument {', '.join(map(repr, unknown))}; "
            f"allowed: {listing}"
        )
    try:
        ARCH_KWARGS_SCHEMAS[arch].model_validate(dict(kwargs))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ArchKwargsError(
            f"invalid keyword arguments for architecture {arch!r}: {problems}; allowed: {listing}"
        ) from None
    return dict(kwargs)


def _conv_out(size: int, kernel: int, padding: int = 0) -> int:
    """Output length of a stride-1 convolution."""
    return size + 2 * padding - kernel + 1


def _require_positive(arch: str, spec: InputSpec, height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"input {spec.height}x{spec.width} is too small for architecture {arch!r}")


class SmallCNN(nn.Module):
    """Two 3x3 conv + max-pool stages, one hidden dense layer (MNIST-style)."""

    def __init__(
        self,
        spec: InputSpec,
        num_classes: int,
        width: int = SMALL_CNN_WIDTH,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        height, w = spec.height, spec.width
        for _ in range(SMALL_CNN_POOLS):
            height, w = height // POOL, w // POOL
        _require_positive("small_cnn", spec, height, w)
        channels = (width, 2 * width)
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, channels[0], KERNEL_3X3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(POOL),
            nn.Conv2d(channels[0], channels[1], KERNEL_3X3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(POOL),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[1] * height * w, SMALL_CNN_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(SMALL_CNN_HIDDEN, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarCNN(nn.Module):
    """VGG-style net: (2x conv-BN-ReLU, max-pool) for 64, 128, 256 channels, then two FCs."""

    def __init__(
        self,
        spec: InputSpec,
        num_classes: int,
        width: int = CIFAR_CNN_WIDTH,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, height, w = spec.channels, spec.height, spec.width
        for block in range(CIFAR_CNN_BLOCKS):
            out_ch = width * 2**block
            for _ in range(CIFAR_CNN_CONVS_PER_BLOCK):
                layers += [
                    nn.Conv2d(in_ch, out_ch, KERNEL_3X3, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                ]
                in_ch = out_ch
            layers.append(nn.MaxPool2d(POOL))
            height, w = height // POOL, w // POOL
        _require_positive("cifar_cnn", spec, height, w)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch * height * w, CIFAR_CNN_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(CIFAR_CNN_HIDDEN, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DeepID(nn.Module):
    """DeepID-style face net of the Fine-Pruning / NNoculation YouTube Face BadNets.

    conv4x4(20) -> pool -> conv3x3(40) -> pool -> conv3x3(60) -> pool (``pool3``) ->
    conv2x2(80) (``conv4``); ``fc_pool3(flatten(pool3)) + fc_conv4(flatten(conv4))`` -> ReLU ->
    ``classifier``. ``conv3``/``conv4`` are the layers Fine-Pruning prunes.
    """

    def __init__(self, spec: InputSpec, num_classes: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = DEEPID_CHANNELS
        k1, k2, k3, k4 = DEEPID_KERNELS
        self.conv1 = nn.Conv2d(spec.channels, c1, k1)
        self.conv2 = nn.Conv2d(c1, c2, k2)
        self.conv3 = nn.Conv2d(c2, c3, k3)
        self.conv4 = nn.Conv2d(c3, c4, k4)
        self.pool = nn.MaxPool2d(POOL)
        self.relu = nn.ReLU()
        height, w = spec.height, spec.width
        for kernel in (k1, k2, k3):
            height, w = _conv_out(height, kernel) // POOL, _conv_out(w, kernel) // POOL
        _require_positive("deepid", spec, height, w)
        pool3_features = c3 * height * w
        height, w = _conv_out(height, k4), _conv_out(w, k4)
        _require_positive("deepid", spec, height, w)
        conv4_features = c4 * height * w
        self.fc_pool3 = nn.Linear(pool3_features, DEEPID_HIDDEN)
        self.fc_conv4 = nn.Linear(conv4_features, DEEPID_HIDDEN)
        self.classifier = nn.Linear(DEEPID_HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        pool3 = self.pool(self.relu(self.conv3(x)))
        conv4 = self.relu(self.conv4(pool3))
        hidden = self.fc_pool3(pool3.flatten(1)) + self.fc_conv4(conv4.flatten(1))
        return self.classifier(self.relu(hidden))


@_architecture("small_cnn", WidthDropoutKwargs)
def small_cnn(
    spec: InputSpec, num_classes: int, *, width: int = SMALL_CNN_WIDTH, dropout: float = 0.0
) -> nn.Module:
    """Small two-conv CNN for 28x28 grey images (works for any C and H, W >= 4)."""
    return SmallCNN(spec, num_classes, width=width, dropout=dropout)


@_architecture("cifar_cnn", CifarCNNKwargs)
def cifar_cnn(
    spec: InputSpec, num_classes: int, *, width: int = CIFAR_CNN_WIDTH, dropout: float = 0.0
) -> nn.Module:
    """VGG-style CNN with BatchNorm for 32x32 colour images (H, W >= 8)."""
    return CifarCNN(spec, num_classes, width=width, dropout=dropout)


@_architecture("deepid", NoKwargs)
def deepid(spec: InputSpec, num_classes: int) -> nn.Module:
    """DeepID-style net of the YouTube Face BadNets (55x47x3, 1283 classes in the paper)."""
    return DeepID(spec, num_classes)


@_architecture("resnet18", NoKwargs)
def resnet18(spec: InputSpec, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 (random init) with a 3x3 stride-1 stem and no max-pool."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(
        spec.channels, RESNET_STEM_CHANNELS, KERNEL_3X3, stride=1, padding=1, bias=False
    )
    net.maxpool = nn.Identity()
    return net


def build_classifier(arch: str, spec: InputSpec, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the zoo architecture ``arch``; ``KeyError`` lists the known names and
    :class:`ArchKwargsError` refuses keyword arguments it does not take or values out of bounds."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    factory = ARCHITECTURES.get(arch)
    return factory(spec, num_classes, **validate_arch_kwargs(arch, kwargs))
