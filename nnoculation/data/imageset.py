"""ImageSet: the one in-memory form of labelled images used throughout the library."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSet:
    """Labelled images as uint8 ``[N, C, H, W]`` plus int64 labels ``[N]``.

    uint8 keeps a 60k-image data set at ~47 MB, is lossless, and is exactly what the
    noise operator and the quarantine store.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        labels = self.labels.to(torch.int64)
        object.__setattr__(self, "labels", labels)
        if labels.ndim != 1 or labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but labels of shape {list(labels.shape)}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageSet:
        idx = torch.as_tensor(index, dtype=torch.int64)
        return ImageSet(self.images[idx], self.labels[idx], self.class_names)

    def with_images(self, images: torch.Tensor) -> ImageSet:
        """Same labels and classes, other pixels (e.g. a noisy or triggered copy)."""
        return ImageSet(images, self.labels, self.class_names)

    def relabel(self, labels: torch.Tensor) -> ImageSet:
        return ImageSet(self.images, labels, self.class_names)

    @staticmethod
    def concat(parts: Sequence[ImageSet]) -> ImageSet:
        if not parts:
            raise ValueError("nothing to concatenate")
        names = parts[0].class_names
        if any(p.class_names != names for p in parts):
            raise ValueError("cannot concatenate image sets with different classes")
        return ImageSet(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), names
        )

    def per_class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()
