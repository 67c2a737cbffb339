"""Data sources read real files; the protocol's splits are seeded and never overlap."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nnoculation.data.imageset import ImageSet
from nnoculation.data.sources import (
    FASHION_MNIST_DEBIAN_PACKAGE,
    DataNotFoundError,
    DataSource,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
)
from nnoculation.data.splits import SplitConfig, make_splits


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(root: Path, n_train: int = 300, n_test: int = 100) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_idx_files_are_read(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    src = load_fashion_mnist(tmp_path)
    assert src.train.images.shape == (300, 1, 28, 28) and src.train.images.dtype == torch.uint8
    assert src.test is not None and len(src.test) == 100
    assert src.train.class_names[0] == "T-shirt/top" and src.train.num_classes == 10


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=FASHION_MNIST_DEBIAN_PACKAGE):
        load_fashion_mnist(tmp_path / "nowhere")


def test_digits_are_scaled_to_uint8() -> None:
    src = load_digits()
    assert src.train.images.shape == (1797, 1, 8, 8)
    assert int(src.train.images.max()) == 255 and src.train.num_classes == 10


def test_npz_nhwc_and_test_part(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "set.npz"
    images = rng.integers(0, 256, (20, 8, 6, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    np.savez(
        path,
        images=images,
        labels=np.arange(20) % 2,
        class_names=np.array(["cat", "dog"]),
        test_images=test_images,
        test_labels=np.array([0, 1, 1, 0]),
    )
    src = load_dataset(str(path))
    assert src.train.images.shape == (20, 3, 8, 6)
    # Pixel (y, x) of channel c moves from [n, y, x, c] to [n, c, y, x], not just the shape.
    assert torch.equal(src.train.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(src.train.labels, torch.arange(20) % 2)
    assert src.train.class_names == ("cat", "dog")
    assert src.test is not None and src.test.images.shape == (4, 3, 8, 6)
    assert torch.equal(src.test.images, torch.from_numpy(test_images).permute(0, 3, 1, 2))
    assert src.test.labels.tolist() == [0, 1, 1, 0]


def test_npz_rejects_float_images(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 4, 4), dtype=np.float32), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="uint8"):
        load_npz(path)


def test_image_folder_one_subfolder_per_class(tmp_path: Path) -> None:
    for k, name in enumerate(["apple", "pear"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((5, 7), 40 * k + i, dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    src = load_image_folder(tmp_path)
    assert src.train.class_names == ("apple", "pear")
    assert src.train.images.shape == (6, 1, 5, 7)
    assert src.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(src.train.images[3, 0, 0, 0]) == 40


def _ids(s: ImageSet) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in s.images}


def test_splits_follow_the_protocol_and_never_overlap() -> None:
    n, side = 1200, 6
    g = torch.Generator().manual_seed(0)
    # Unique images so overlaps are detectable by content.
    images = torch.randint(0, 256, (n, 1, side, side), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    train = ImageSet(images[:1000], labels[:1000], ("a", "b", "c", "d"))
    test = ImageSet(images[1000:], labels[1000:], ("a", "b", "c", "d"))
    cfg = SplitConfig(validation_per_class=50, holdout_per_class=10, stream_fraction=0.5, seed=3)
    sp = make_splits(DataSource("toy", train, test), cfg)
    assert sp.retrain.per_class_counts() == [40] * 4
    assert sp.holdout.per_class_counts() == [10] * 4
    assert len(sp.attacker) == 800 and len(sp.stream) == 100 and len(sp.test) == 100
    parts = [_ids(getattr(sp, p)) for p in ("attacker", "retrain", "holdout", "stream", "test")]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == n
    again = make_splits(DataSource("toy", train, test), cfg)
    assert torch.equal(again.holdout.images, sp.holdout.images)
    other = make_splits(DataSource("toy", train, test), SplitConfig(50, 10, 0.5, seed=4))
    assert not torch.equal(other.holdout.images, sp.holdout.images)


def test_split_without_test_part_carves_one() -> None:
    src = load_digits()
    sp = make_splits(
        src, SplitConfig(validation_per_class=20, holdout_per_class=5, test_fraction=0.2)
    )
    assert len(sp.stream) + len(sp.test) == round(1797 * 0.2)
    assert len(sp.validation) == 200
    # The carved part never overlaps the rest (unique images: overlaps show by content).
    n = 1000
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(5),
                           dtype=torch.uint8)  # fmt: skip
    train = ImageSet(images, torch.arange(n) % 4, ("a", "b", "c", "d"))
    cfg = SplitConfig(validation_per_class=50, holdout_per_class=10, test_fraction=0.2, seed=3)
    sp = make_splits(DataSource("toy", train, None), cfg)
    parts = [_ids(getattr(sp, p)) for p in ("attacker", "retrain", "holdout", "stream", "test")]
    assert len(sp.stream) + len(sp.test) == 200
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == n


def test_asking_for_more_validation_than_a_class_has_fails_clearly() -> None:
    src = load_digits()
    with pytest.raises(ValueError, match="fewer than"):
        make_splits(src, SplitConfig(validation_per_class=500, holdout_per_class=10))
