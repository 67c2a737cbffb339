"""A deployment loaded for inference: BadNet + GoodNet of one store version, on one device.

This is the library's one call for serving (sec. 3.3): :func:`load_deployment` opens a version
from the model store (checksums verified), moves both nets to the chosen device in eval mode
once, and :meth:`LoadedDeployment.classify` runs a batch of raw uint8 images through both,
returning labels, both nets' scores and the disagreement mask. ``classify`` never toggles
module state and runs under ``torch.inference_mode``, so several threads may call it at once
and a swap to another version is one reference assignment by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.bundle import Bundle
from models.nets import Net
from models.spec import InputSpec
from models.store_base import BundleStore
from nnoculation.ensemble import ensemble_rule
from nnoculation.pipeline import VALIDATION_GROUP

ROLES = ("badnet", "goodnet")
WARM_UP_BATCH = 8


@dataclass(frozen=True)
class Classified:
    """Per input: the answer (sec. 3.3), each net's label and logits, and the disagreement."""

    labels: torch.Tensor  # int64 [N]
    badnet_labels: torch.Tensor  # int64 [N]
    goodnet_labels: torch.Tensor  # int64 [N]
    badnet_scores: torch.Tensor  # float32 [N, K] logits
    goodnet_scores: torch.Tensor  # float32 [N, K] logits

    @property
    def disagree(self) -> torch.Tensor:
        """bool [N]: the inputs to quarantine."""
        return self.badnet_labels != self.goodnet_labels


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"`` or None: CUDA when present, else the CPU; anything else as torch reads it."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device")
    return device


class LoadedDeployment:
    """Both nets of one deployment version, ready for concurrent inference."""

    def __init__(
        self,
        deployment: str,
        bundle: Bundle,
        badnet: Net,
        goodnet: Net,
        device: torch.device,
    ) -> None:
        self.deployment = deployment
        self.bundle = bundle
        self.device = device
        self.spec: InputSpec = bundle.spec  # read once: the manifest rebuilds it on each access
        self.class_names: list[str] = bundle.class_names
        self.version: str = bundle.manifest.version
        self.badnet = badnet.to(device).train_mode(False)
        self.goodnet = goodnet.to(device).train_mode(False)

    def _logits(self, net: Net, x: torch.Tensor) -> torch.Tensor:
        return net.module(x).float().cpu()

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        self.spec.check(images)
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        return self.spec.to_model_input(images.to(self.device, non_blocking=True))

    def classify(self, images: torch.Tensor) -> Classified:
        """Run uint8 ``images`` ``[N, C, H, W]`` through both nets (one forward pass each)."""
        with torch.inference_mode():
            x = self._inputs(images)
            bad = self._logits(self.badnet, x)
            good = self._logits(self.goodnet, x)
        out = ensemble_rule(bad.argmax(1), good.argmax(1))
        return Classified(out.labels, out.badnet_labels, out.goodnet_labels, bad, good)

    def predict_single(self, role: str, images: torch.Tensor) -> torch.Tensor:
        """Labels of one net alone (``"badnet"`` or ``"goodnet"``); for baselines."""
        net = {"badnet": self.badnet, "goodnet": self.goodnet}[role]
        with torch.inference_mode():
            return self._logits(net, self._inputs(images)).argmax(1)

    def known_inputs(self, count: int = WARM_UP_BATCH) -> torch.Tensor:
        """A few clean validation images of the bundle (zeros if it holds none)."""
        try:
            images = self.bundle.tensors(VALIDATION_GROUP)["holdout_images"][:count]
        except KeyError:
            images = torch.zeros((count, *self.spec.shape), dtype=torch.uint8)
        return images

    def warm_up(self) -> dict[str, Any]:
        """Run known inputs through both nets (allocations, lazy init, CUDA kernels) and check
        the outputs are finite; returns what it saw. Raises ``ValueError`` on a broken net."""
        images = self.known_inputs()
        for size in sorted({1, images.shape[0]}):
            out = self.classify(images[:size])
            for name, scores in (("badnet", out.badnet_scores), ("goodnet", out.goodnet_scores)):
                if not torch.isfinite(scores).all():
                    raise ValueError(f"{name} of version {self.version} gives non-finite logits")
        return {"images": int(images.shape[0]), "disagree": int(out.disagree.sum())}


def load_deployment(
    store: BundleStore,
    deployment: str,
    version: str | None = None,
    device: str | torch.device | None = None,
) -> LoadedDeployment:
    """Open ``version`` (default: the active one) of ``deployment`` from ``store``, verify its
    checksums, and load both nets onto ``device`` (default: CUDA when present)."""
    bundle = store.load(deployment, version)
    missing = [role for role in ROLES if role not in bundle.roles]
    if missing:
        raise ValueError(
            f"version {bundle.manifest.version} of {deployment!r} is not a deployment: it has "
            f"no {' or '.join(missing)}; publish the output of `nnoculation predeploy`"
        )
    return LoadedDeployment(
        deployment, bundle, bundle.net("badnet"), bundle.net("goodnet"), resolve_device(device)
    )
