"""Quarantine sources: the suspect inputs a repair learns the trigger from (domain B).

Today they come from a ``.npz`` (as written by ``nnoculation stream``) or a folder of image
files; the online service's Redis quarantine hands the same uint8 tensor to the same repair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.spec import InputSpec
from nnoculation.data.sources import IMAGE_SUFFIXES, DataNotFoundError
from nnoculation.inputs import DecodePolicy, ImageInputError, decode_image


class QuarantineError(ValueError):
    """The quarantine cannot be used with this bundle (wrong shape, empty, unreadable)."""


def _check(images: torch.Tensor, spec: InputSpec, source: str) -> torch.Tensor:
    if images.shape[0] == 0:
        raise QuarantineError(f"{source}: the quarantine is empty")
    if tuple(images.shape[1:]) != spec.shape:
        raise QuarantineError(
            f"{source}: quarantined images are {list(images.shape[1:])} (C, H, W) but the "
            f"bundle's nets take {list(spec.shape)}"
        )
    return images


def quarantine_from_npz(path: Path, spec: InputSpec) -> torch.Tensor:
    """``images`` of a ``.npz`` (uint8, NHWC, NHW or NCHW) as ``[N, C, H, W]``."""
    with np.load(path, allow_pickle=False) as data:
        if "images" not in data.files:
            raise QuarantineError(f"{path}: no 'images' array (has {data.files})")
        array = data["images"]
    if array.dtype != np.uint8:
        raise QuarantineError(f"{path}: images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] == spec.channels and array.shape[1] != spec.channels:
        array = array.transpose(0, 3, 1, 2)
    return _check(torch.from_numpy(np.ascontiguousarray(array)), spec, str(path))


# Offline, images collected elsewhere may have any mode (converted) and any size (resized).
FOLDER_POLICY = DecodePolicy(modes=None, max_pixels=Image.MAX_IMAGE_PIXELS or 1 << 30)


def quarantine_from_folder(path: Path, spec: InputSpec) -> torch.Tensor:
    """Every image file under ``path`` (recursively), decoded by the service's own
    preprocessing (:func:`nnoculation.inputs.decode_image`): converted to the bundle's
    channels and resized to its input size."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = []
    for f in files:
        try:
            images.append(decode_image(f.read_bytes(), spec, FOLDER_POLICY))
        except ImageInputError as err:
            raise QuarantineError(f"{f}: {err}") from None
    if not images:
        raise QuarantineError(f"{path}: no image files found")
    return _check(torch.stack(images), spec, str(path))


def load_quarantine(path: Path | str, spec: InputSpec) -> torch.Tensor:
    """Quarantined images as uint8 ``[N, C, H, W]`` from a ``.npz`` file or an image folder."""
    path = Path(path)
    if not path.exists():
        raise DataNotFoundError(f"no such quarantine: {path}")
    if path.is_dir():
        return quarantine_from_folder(path, spec)
    if path.suffix == ".npz":
        return quarantine_from_npz(path, spec)
    raise QuarantineError(f"{path}: a quarantine is a .npz file or a folder of images")
