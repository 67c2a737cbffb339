"""From encoded image bytes to the uint8 tensor a bundle's nets take: the one preprocessing path.

The online service decodes every upload with :func:`decode_image`, and offline code that reads
image files (quarantine folders) uses the same function, so an image gives the same tensor
whichever way it enters the system. Decoding is defensive because the bytes come from anyone:

* the format is sniffed from the magic bytes and must be one of ``DecodePolicy.formats``;
  Pillow is then told to try that decoder alone (``Image.open(..., formats=[...])``);
* the pixel count is checked from the header, before any pixel is decoded, against a cap sized
  to the model (``DecodePolicy.max_pixels``), which also stops decompression bombs;
* animated images and modes other than ``DecodePolicy.modes`` are refused with a reason
  rather than silently flattened (an alpha channel or a palette would otherwise be resolved
  in a way the sender cannot see);
* the image is converted to the spec's channels and, if ``resize`` is on, resized
  bilinearly to its height and width.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.spec import InputSpec

# Magic bytes of the formats we know by name (accepted or not), Pillow's format names.
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"8BPS", 0, "PSD"),
    (b"%PDF", 0, "PDF"),
)
_WEBP = (b"RIFF", b"WEBP")  # RIFF....WEBP

DEFAULT_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "TIFF")
DEFAULT_MODES = ("L", "RGB")
# The pixel cap is this many times the model's own input size: a 28x28 model accepts images
# up to ~224x224, enough for a photo meant for it, far below a decompression bomb.
DEFAULT_PIXEL_CAP_FACTOR = 64
MIN_PIXEL_CAP = 64 * 64

MIME_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
}


class ImageInputError(ValueError):
    """An upload cannot be turned into a model input; ``status`` is the HTTP status to answer."""

    status = 422


class EmptyImageError(ImageInputError):
    pass


class UnsupportedImageFormatError(ImageInputError):
    status = 415


class UndecodableImageError(ImageInputError):
    pass


class ImageTooLargeError(ImageInputError):
    pass


class UnsupportedImageModeError(ImageInputError):
    pass


class WrongImageSizeError(ImageInputError):
    pass


@dataclass(frozen=True)
class DecodePolicy:
    """What :func:`decode_image` accepts. ``modes=None`` converts any mode (offline use)."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    modes: tuple[str, ...] | None = DEFAULT_MODES
    max_pixels: int = MIN_PIXEL_CAP
    resize: bool = True

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("a decode policy needs at least one format")
        unknown = set(self.formats) - set(MIME_TYPES)
        if unknown:
            raise ValueError(f"unknown image formats {sorted(unknown)}; known: {list(MIME_TYPES)}")
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")

    @classmethod
    def for_spec(
        cls, spec: InputSpec, pixel_cap_factor: int = DEFAULT_PIXEL_CAP_FACTOR, **kwargs: object
    ) -> DecodePolicy:
        """A policy whose pixel cap is ``pixel_cap_factor`` times the model's input size."""
        cap = max(MIN_PIXEL_CAP, spec.height * spec.width * pixel_cap_factor)
        return cls(max_pixels=cap, **kwargs)  # type: ignore[arg-type]


def sniff_format(data: bytes) -> str | None:
    """Pillow's name of the format the magic bytes announce, or None when unknown."""
    if len(data) >= 12 and data[:4] == _WEBP[0] and data[8:12] == _WEBP[1]:
        return "WEBP"
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def decode_image(data: bytes, spec: InputSpec, policy: DecodePolicy | None = None) -> torch.Tensor:
    """Decode ``data`` into uint8 ``[C, H, W]`` for ``spec``; raises :class:`ImageInputError`."""
    policy = policy or DecodePolicy.for_spec(spec)
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None or fmt not in policy.formats:
        what = f"{fmt} images are not accepted" if fmt else "the body is not an image we read"
        raise UnsupportedImageFormatError(f"{what}; send one of {', '.join(policy.formats)}")
    with warnings.catch_warnings():
        # Pillow warns (then raises) on decompression bombs; our cap is far lower, but a
        # warning must never let an image through.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                return _to_tensor(im, spec, policy)
        except ImageInputError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ImageTooLargeError("the image has too many pixels") from None
        except UnidentifiedImageError:
            raise UndecodableImageError(f"the {fmt} data is corrupt or truncated") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise UndecodableImageError(
                f"the {fmt} image cannot be decoded: {_first_line(err)}"
            ) from None


def _to_tensor(im: Image.Image, spec: InputSpec, policy: DecodePolicy) -> torch.Tensor:
    width, height = im.size
    if width * height > policy.max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} ({width * height} pixels); at most "
            f"{policy.max_pixels} pixels are accepted for this model"
        )
    if getattr(im, "n_frames", 1) > 1:
        raise UndecodableImageError("animated images are not accepted; send a single frame")
    if policy.modes is not None and im.mode not in policy.modes:
        raise UnsupportedImageModeError(
            f"image mode {im.mode!r} is not accepted; send 8-bit "
            + " or ".join({"L": "grayscale", "RGB": "RGB"}.get(m, m) for m in policy.modes)
        )
    im.load()
    target = "L" if spec.channels == 1 else "RGB"
    if spec.channels not in (1, 3):
        raise ValueError(f"images can feed 1- or 3-channel models, not {spec.channels}")
    if im.mode != target:
        im = im.convert(target)
    if im.size != (spec.width, spec.height):
        if not policy.resize:
            raise WrongImageSizeError(
                f"the image is {width}x{height}; this model takes {spec.width}x{spec.height}"
            )
        im = im.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(im, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())  # a writable, contiguous copy


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) as PNG bytes, lossless: how quarantined inputs are
    shown to operators."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected uint8 [1|3, H, W], got {image.dtype} {list(image.shape)}")
    array = image.numpy()
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
