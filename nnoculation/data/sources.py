"""Where labelled images come from: Fashion-MNIST IDX files, scikit-learn digits, an image
folder (one sub-folder per class) or a ``.npz`` file. Nothing is ever downloaded."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.registry import Registry
from nnoculation.data.imageset import ImageSet

FASHION_MNIST_ENV = "NNOC_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_UBYTE = 0x08
DIGITS_MAX_VALUE = 16  # scikit-learn's digits use 17 grey levels, 0..16
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataNotFoundError(FileNotFoundError):
    """A data set is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class DataSource:
    """A data set as published: a training part and, where the publisher fixed one, a test part."""

    name: str
    train: ImageSet
    test: ImageSet | None = None


DATASETS: Registry[Callable[[], DataSource]] = Registry("dataset")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DataNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found under {root}. Install it with "
        f"`apt-get install {FASHION_MNIST_DEBIAN_PACKAGE}` (as root) or point "
        f"${FASHION_MNIST_ENV} at a folder holding the four IDX files."
    )


def load_fashion_mnist(root: Path | str | None = None) -> DataSource:
    """Fashion-MNIST from its IDX files (default ``/usr/share/datasets/fashion-mnist``)."""
    base = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(base, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(base, f"{prefix}-labels-idx1-ubyte"))
        parts[split] = ImageSet(
            torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
            FASHION_MNIST_CLASSES,
        )
    return DataSource("fashion-mnist", parts["train"], parts["test"])


def load_digits() -> DataSource:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package), scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataNotFoundError(
            "the digits data set ships with scikit-learn: pip install 'nnoculation[digits]'"
        ) from exc
    bunch = sk_load_digits()
    scaled = np.rint(bunch.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    images = torch.from_numpy(scaled).unsqueeze(1)
    names = tuple(str(n) for n in bunch.target_names)
    return DataSource("digits", ImageSet(images, torch.from_numpy(bunch.target), names))


def _to_nchw(array: np.ndarray, source: str) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        array = array[:, None, :, :]
    elif array.ndim == 4 and array.shape[-1] in (1, 3, 4) and array.shape[1] not in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 4:
        raise ValueError(f"{source}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W]")
    return torch.from_numpy(np.ascontiguousarray(array))


def load_npz(path: Path | str) -> DataSource:
    """A ``.npz`` with ``images`` (uint8, NHW / NHWC / NCHW), ``labels`` and optionally
    ``class_names``; a ``test_images`` / ``test_labels`` pair, when present, is its test part."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {data.files})")
        labels = data["labels"].astype(np.int64)
        if "class_names" in data.files:
            names = tuple(str(n) for n in data["class_names"])
        else:
            names = tuple(str(i) for i in range(int(labels.max()) + 1))
        train = ImageSet(_to_nchw(data["images"], str(path)), torch.from_numpy(labels), names)
        test = None
        if "test_images" in data.files:
            test = ImageSet(
                _to_nchw(data["test_images"], str(path)),
                torch.from_numpy(data["test_labels"].astype(np.int64)),
                names,
            )
    return DataSource(path.stem, train, test)


def load_image_folder(path: Path | str, grayscale: bool | None = None) -> DataSource:
    """A folder with one sub-folder per class (sorted names are the classes) of image files.

    All images must share one size; ``grayscale`` forces one channel (default: grey when every
    image is single-channel).
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise DataNotFoundError(f"no such folder: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} holds no class sub-folders")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files += [
            (f, label)
            for f in sorted((root / name).iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not files:
        raise ValueError(f"{root}: no image files found in its class folders")
    modes: set[str] = set()
    images = []
    for f, _ in files:
        with Image.open(f) as im:
            modes.add(im.mode)
            images.append(im.copy())
    if grayscale is None:
        grayscale = modes <= {"L", "1", "I;16"}
    mode = "L" if grayscale else "RGB"
    arrays = [np.asarray(im.convert(mode)) for im in images]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"{root}: images have different sizes {sorted(sizes)}; resize them first")
    stacked = np.stack(arrays)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return DataSource(root.name, ImageSet(_to_nchw(stacked, str(root)), labels, tuple(classes)))


DATASETS.register("fashion-mnist")(load_fashion_mnist)
DATASETS.register("digits")(load_digits)


def load_dataset(name_or_path: str) -> DataSource:
    """A registered data set by name, else a ``.npz`` file or an image folder by path."""
    if name_or_path in DATASETS:
        return DATASETS.get(name_or_path)()
    path = Path(name_or_path)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
    raise DataNotFoundError(
        f"{name_or_path!r} is neither a known data set ({', '.join(DATASETS.names())}), "
        "a .npz file nor an image folder"
    )
