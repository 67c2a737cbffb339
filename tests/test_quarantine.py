"""Quarantine sources: .npz and image folders, checked against the bundle's input spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.spec import InputSpec
from nnoculation.repair.quarantine import QuarantineError, load_quarantine

SPEC = InputSpec(1, 12, 12)


def test_npz_nhwc_and_nchw(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 1), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images)
    np.savez(tmp_path / "b.npz", images=images.transpose(0, 3, 1, 2))
    a = load_quarantine(tmp_path / "a.npz", SPEC)
    b = load_quarantine(tmp_path / "b.npz", SPEC)
    assert a.shape == (5, 1, 12, 12) and (a == b).all()
    assert int(a[2, 0, 3, 4]) == int(images[2, 3, 4, 0])


def test_folder_images_are_converted_and_resized(tmp_path: Path) -> None:
    (tmp_path / "q" / "sub").mkdir(parents=True)
    ramp = np.arange(24, dtype=np.uint8) * 10  # a colour gradient: a crop or one channel differs
    rgb = np.stack([np.add.outer(ramp, ramp // 2), np.tile(ramp, (24, 1)), np.full((24, 24), 30)],
                   axis=-1).astype(np.uint8)  # fmt: skip
    Image.fromarray(rgb, "RGB").save(tmp_path / "q" / "one.png")
    Image.new("L", (12, 12), 90).save(tmp_path / "q" / "sub" / "two.png")
    q = load_quarantine(tmp_path / "q", SPEC)
    assert q.shape == (2, 1, 12, 12)
    expected = Image.fromarray(rgb, "RGB").convert("L").resize((12, 12), Image.Resampling.BILINEAR)
    assert np.array_equal(q[0, 0].numpy(), np.asarray(expected))
    assert int(q[1, 0, 0, 0]) == 90


def test_wrong_shape_and_empty_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "big.npz", images=np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(QuarantineError, match="bundle's nets take"):
        load_quarantine(tmp_path / "big.npz", SPEC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuarantineError, match="no image files"):
        load_quarantine(tmp_path / "empty", SPEC)
    np.savez(tmp_path / "float.npz", images=np.zeros((3, 12, 12), dtype=np.float32))
    with pytest.raises(QuarantineError, match="uint8"):
        load_quarantine(tmp_path / "float.npz", SPEC)
