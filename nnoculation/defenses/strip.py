"""STRIP (Gao et al., ACSAC 2019), the run-time detector of the paper's Table 5.

For an input ``x`` STRIP superimposes ``n`` clean images ``x_j`` on it, classifies each
superimposed image and takes the Shannon entropy (base 2) of each one's class distribution
(softmax); the input's *normalised entropy* is their mean over the ``n`` superimpositions. A
trojaned input keeps its trigger under superimposition, so the BadNet keeps answering the
target with confidence and the entropy is low; a clean input's label wanders. The threshold is
set empirically on clean data: the ``frr`` quantile of the clean hold-out images' entropies
(5 %, the paper's Table 5 setting), and inputs whose entropy lies below it are refused.

Superimposition follows STRIP's reference code, ``cv2.addWeighted(x, 1, x_j, 1, 0)`` on uint8
images: the pixel sum, saturated at 255 (``blend="add"``); ``blend="average"`` gives the
mean of the two images (what the Adversarial Robustness Toolbox does) for comparison only.
The overlays are drawn, seeded and without replacement per input, from the ``retrain`` split
(clean images the threshold and the tested inputs are not drawn from); the threshold is set on
the ``holdout`` split.

Cost: every refused-or-not decision runs the net on ``n`` superimposed images, i.e. ``n``
forward passes per input on top of the prediction itself.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.nets import Net
from nnoculation.defenses.base import Defended, DefenseInputs, Rejecting, register, timed
from nnoculation.metrics import Predictor

Blend = Literal["add", "average"]
DEFAULT_SUPERIMPOSITIONS = 100  # STRIP's N, the paper's Table 5 setting
DEFAULT_FRR = 0.05
INPUTS_PER_CHUNK = 32  # inputs whose n superimpositions go through the net at once
SCORE_SEED_OFFSET = 1  # the draws for tested inputs differ from those for the threshold


def superimpose(images: torch.Tensor, overlays: torch.Tensor, blend: Blend = "add") -> torch.Tensor:
    """``images [M, C, H, W]`` each blended with its own ``overlays [M, n, C, H, W]`` (uint8):
    ``[M * n, C, H, W]`` uint8, the ``n`` blends of input 0 first."""
    base = images.unsqueeze(1).to(torch.int16)
    over = overlays.to(torch.int16)
    mixed = (base + over).clamp_(max=255) if blend == "add" else (base + over + 1) // 2
    return mixed.to(torch.uint8).flatten(0, 1)


def strip_entropy(
    net: Net,
    images: torch.Tensor,
    pool: torch.Tensor,
    n: int = DEFAULT_SUPERIMPOSITIONS,
    seed: int = 0,
    blend: Blend = "add",
    progress: bool = False,
) -> torch.Tensor:
    """STRIP's normalised entropy (bits) of each of ``images`` (uint8 ``[M, C, H, W]``).

    Each input gets ``n`` distinct overlays from ``pool`` (uint8 clean images), drawn with a
    local generator seeded with ``seed`` so the same call gives the same scores; the result
    is the mean over the ``n`` superimposed images of the entropy of the net's softmax.
    Runs ``n`` forward passes per input.
    """
    if not 1 <= n <= len(pool):
        raise ValueError(f"n must lie in [1, {len(pool)}] (the clean pool's size), got {n}")
    net.spec.check(images)
    net.spec.check(pool)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(images.shape[0])
    bar = tqdm(
        total=images.shape[0],
        desc="strip",
        disable=None if progress else True,
        leave=False,
        unit="in",
    )
    try:
        for start in range(0, images.shape[0], INPUTS_PER_CHUNK):
            chunk = images[start : start + INPUTS_PER_CHUNK]
            picks = torch.rand(chunk.shape[0], len(pool), generator=g).argsort(dim=1)[:, :n]
            blended = superimpose(chunk, pool[picks], blend)
            probs = F.softmax(net.scores(blended), dim=1)
            per_image = -(probs * torch.log2(probs.clamp_min(1e-30))).sum(dim=1)
            out[start : start + chunk.shape[0]] = per_image.view(chunk.shape[0], n).mean(dim=1)
            bar.update(chunk.shape[0])
    finally:
        bar.close()
    return out


class StripDetector:
    """The deployed detector: refuses inputs whose STRIP entropy lies below ``threshold``."""

    def __init__(
        self, net: Net, pool: torch.Tensor, threshold: float, n: int, seed: int, blend: Blend
    ) -> None:
        self.net, self.pool, self.threshold = net, pool, threshold
        self.n, self.seed, self.blend = n, seed, blend

    def entropy(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised entropy of each input (seeded: the same batch gets the same scores)."""
        return strip_entropy(
            self.net, images, self.pool, self.n, self.seed + SCORE_SEED_OFFSET, self.blend
        )

    def refuse(self, images: torch.Tensor) -> torch.Tensor:
        """True where STRIP flags the input as trojaned (entropy below the threshold)."""
        return self.entropy(images) < self.threshold


@register
class Strip:
    """STRIP with the threshold at a chosen false rejection rate on clean data (module doc)."""

    name: ClassVar[str] = "strip"

    def __init__(
        self,
        n: int = DEFAULT_SUPERIMPOSITIONS,
        frr: float = DEFAULT_FRR,
        blend: Blend = "add",
        progress: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"n (superimpositions per input) must be >= 1, got {n}")
        if not 0.0 < frr < 1.0:
            raise ValueError(f"frr is a fraction in (0, 1), got {frr}")
        if blend not in ("add", "average"):
            raise ValueError(f"blend must be 'add' or 'average', got {blend!r}")
        self.n, self.frr, self.blend, self.progress = n, frr, blend, progress

    def run(self, inputs: DefenseInputs) -> Defended:
        """Set the threshold on the hold-out clean images; overlays come from ``retrain``
        (:meth:`fit` checks the inputs before any work)."""
        return timed(lambda: self._run(inputs), self.name)

    def _check(self, inputs: DefenseInputs) -> None:
        if len(inputs.retrain) < self.n:
            raise ValueError(
                f"STRIP superimposes {self.n} distinct clean images per input but the retrain "
                f"split has only {len(inputs.retrain)}"
            )
        if len(inputs.holdout) == 0:
            raise ValueError("STRIP needs clean hold-out images to set its threshold")

    def _run(self, inputs: DefenseInputs) -> tuple[Predictor, dict[str, Any]]:
        detector, details = self.fit(inputs)
        return Rejecting(detector.net, detector.refuse), details

    def fit(self, inputs: DefenseInputs) -> tuple[StripDetector, dict[str, Any]]:
        """The detector with its threshold set on ``inputs.holdout``, and what was found
        (``run`` without the timing and the :class:`Rejecting` wrapper)."""
        self._check(inputs)
        net, pool = inputs.badnet, inputs.retrain.images
        clean = strip_entropy(
            net, inputs.holdout.images, pool, self.n, inputs.seed, self.blend, self.progress
        )
        threshold = float(torch.quantile(clean.double(), self.frr))
        detector = StripDetector(net, pool, threshold, self.n, inputs.seed, self.blend)
        details = {
            "threshold": threshold,
            "frr_target": self.frr,
            "frr_on_threshold_data": float((clean < threshold).float().mean()),
            "threshold_images": len(inputs.holdout),
            "n": self.n,
            "blend": self.blend,
            "overlay_pool": len(pool),
            "forward_passes_per_input": self.n,
            "clean_entropy": {
                "mean": float(clean.mean()),
                "min": float(clean.min()),
                "max": float(clean.max()),
            },
        }
        return detector, details
