"""The one preprocessing path from image bytes to model input: identical tensors for lossless
images, conversions, and a clear refusal (with its HTTP status) for everything else."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from models.spec import InputSpec
from nnoculation.inputs import (
    DecodePolicy,
    EmptyImageError,
    ImageTooLargeError,
    UndecodableImageError,
    UnsupportedImageFormatError,
    UnsupportedImageModeError,
    WrongImageSizeError,
    decode_image,
    encode_png,
    sniff_format,
)
from nnoculation.repair.quarantine import quarantine_from_folder
from tests.conftest import synthetic_set

GRAY = InputSpec(1, 12, 12, (0.3,), (0.3,))
RGB = InputSpec(3, 8, 8)


def encode(array: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_give_the_dataset_tensor(fmt: str) -> None:
    images = synthetic_set(5, seed=3).images
    for image in images:
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        data = encode(image[0].numpy(), fmt, **kwargs)
        assert torch.equal(decode_image(data, GRAY), image)


def test_encode_png_round_trips() -> None:
    image = synthetic_set(1, seed=4).images[0]
    assert torch.equal(decode_image(encode_png(image), GRAY), image)
    rgb = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert torch.equal(decode_image(encode_png(rgb), RGB), rgb)


def test_offline_folder_loading_uses_the_same_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    images = synthetic_set(4, seed=5).images
    for i, image in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(encode_png(image))
    assert torch.equal(quarantine_from_folder(tmp_path, GRAY), images)


def test_conversions_and_resize() -> None:
    rgb = np.full((12, 12, 3), (200, 100, 50), dtype=np.uint8)
    gray = decode_image(encode(rgb, "PNG"), GRAY)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert gray.shape == (1, 12, 12) and torch.equal(gray[0], torch.from_numpy(expected.copy()))
    to_rgb = decode_image(encode(np.full((8, 8), 77, np.uint8), "PNG"), RGB)
    assert to_rgb.shape == (3, 8, 8) and int(to_rgb.unique()) == 77
    big = decode_image(encode(np.zeros((24, 24), np.uint8), "PNG"), GRAY)
    assert big.shape == (1, 12, 12)
    with pytest.raises(WrongImageSizeError):
        decode_image(encode(np.zeros((24, 24), np.uint8), "PNG"), GRAY, DecodePolicy(resize=False))


def test_jpeg_is_accepted() -> None:
    out = decode_image(encode(np.full((12, 12), 128, np.uint8), "JPEG"), GRAY)
    assert out.shape == (1, 12, 12) and abs(int(out.float().mean()) - 128) <= 2


def animated_gif() -> bytes:
    frames = [Image.new("L", (12, 12), v) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (12, 12), (v, v, v)) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    return buffer.getvalue()


def png_16bit() -> bytes:
    return encode(np.full((12, 12), 40000, dtype=np.uint16), "PNG")


def palette_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (12, 12), 3).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_INPUTS = {
    "empty": (b"", EmptyImageError, 422),
    "text": (b"hello, this is not an image", UnsupportedImageFormatError, 415),
    "truncated png": (encode(np.zeros((12, 12), np.uint8), "PNG")[:40], UndecodableImageError,
                      422),
    "png magic, garbage after": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, UndecodableImageError, 422),
    "gif": (animated_gif(), UnsupportedImageFormatError, 415),
    "animated webp": (animated_webp(), UndecodableImageError, 422),
    "rgba": (encode(np.zeros((12, 12, 4), np.uint8), "PNG"), UnsupportedImageModeError, 422),
    "16-bit": (png_16bit(), UnsupportedImageModeError, 422),
    "palette": (palette_png(), UnsupportedImageModeError, 422),
    "huge": (encode(np.zeros((2000, 2000), np.uint8), "PNG"), ImageTooLargeError, 422),
    "pdf": (b"%PDF-1.4\n%...", UnsupportedImageFormatError, 415),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused_with_a_status(name: str) -> None:
    data, error, status = BAD_INPUTS[name]
    with pytest.raises(error) as caught:
        decode_image(data, GRAY)
    assert caught.value.status == status
    assert "<" not in str(caught.value), "messages are for people, not object reprs"


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # 30000 x 30000 declared: refused before any pixel is decoded (the data is tiny).
    small = encode(np.zeros((1, 1), np.uint8), "PNG")
    bomb = bytearray(small)
    bomb[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # IHDR's CRC
    with pytest.raises(ImageTooLargeError):
        decode_image(bytes(bomb), GRAY)


def test_pixel_cap_follows_the_spec() -> None:
    assert DecodePolicy.for_spec(InputSpec(1, 28, 28), 64).max_pixels == 28 * 28 * 64
    assert DecodePolicy.for_spec(GRAY, 1).max_pixels == 64 * 64  # never below the floor


def test_sniffing() -> None:
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"nothing") is None
