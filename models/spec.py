"""The input contract of a classifier: image geometry and the normalisation it expects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class InputSpec:
    """What a classifier consumes.

    Images travel through the system as uint8 tensors ``[N, C, H, W]`` (lossless, compact,
    and what the noise operator of sec. 4.2.1 works on). :meth:`to_model_input` turns them
    into the float tensor the network was trained on: ``(x / 255 - mean) / std`` per channel.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def __post_init__(self) -> None:
        if self.channels < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid input shape {self.shape}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) == 1 and self.channels > 1:
                value = value * self.channels
            if len(value) != self.channels:
                raise ValueError(f"{name} has {len(value)} entries for {self.channels} channels")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in 0..255) ``[N, C, H, W]`` -> normalised float32 on the same device."""
        x = images.to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def check(self, images: torch.Tensor) -> None:
        """Raise ``ValueError`` with a readable message when ``images`` do not fit this spec."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(
                f"expected images of shape [N, {self.channels}, {self.height}, {self.width}], "
                f"got {list(images.shape)}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(
            channels=int(data["channels"]),
            height=int(data["height"]),
            width=int(data["width"]),
            mean=tuple(data.get("mean", (0.0,))),
            std=tuple(data.get("std", (1.0,))),
        )
