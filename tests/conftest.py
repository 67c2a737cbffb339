"""Shared fixtures: tiny synthetic data and nets so the default suite runs in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("NNOC_THREADS", "1")
torch.set_num_threads(int(os.environ["NNOC_THREADS"]))

from models.classifiers import build_classifier  # noqa: E402
from models.nets import Net  # noqa: E402
from models.spec import InputSpec  # noqa: E402
from nnoculation.data.imageset import ImageSet  # noqa: E402

NUM_CLASSES = 4
SIDE = 12


def synthetic_set(n: int, seed: int, num_classes: int = NUM_CLASSES, side: int = SIDE) -> ImageSet:
    """Learnable toy images: class k has a bright horizontal band at a class-specific height."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 60, (n, 1, side, side), generator=g, dtype=torch.uint8)
    band = side // num_classes
    for k in range(num_classes):
        rows = slice(k * band, (k + 1) * band)
        images[labels == k, :, rows, :] = 200
    order = torch.randperm(n, generator=g)
    return ImageSet(images[order], labels[order], tuple(f"c{k}" for k in range(num_classes)))


@pytest.fixture
def tiny_spec() -> InputSpec:
    return InputSpec(1, SIDE, SIDE, (0.3,), (0.3,))


@pytest.fixture
def tiny_net(tiny_spec: InputSpec) -> Net:
    torch.manual_seed(0)
    module = build_classifier("small_cnn", tiny_spec, NUM_CLASSES, width=4)
    return Net(module, "zoo", tiny_spec, NUM_CLASSES, "small_cnn", {"width": 4})


@pytest.fixture(scope="session")
def tiny_deployment(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(bundle dir, attack, test set) of a tiny patch BadNet + GoodNet, trained once."""
    from tests.online import tiny_deployment_source

    return tiny_deployment_source(tmp_path_factory.mktemp("tiny"))
