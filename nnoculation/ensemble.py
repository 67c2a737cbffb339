"""The deployed ensemble of sec. 3.3: BadNet and GoodNet side by side.

Where they agree the answer is their common label; where they disagree the input is suspected
to carry a trigger, the answer is the GoodNet's label and the input is quarantined. Either
way the answer equals the GoodNet's label, so the ensemble's CA and ASR are the GoodNet's; the
BadNet's job in serving is to expose the inputs on which the two disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.nets import Net


@dataclass(frozen=True)
class EnsembleOutput:
    """Per input: the answer, both nets' labels and whether it is to be quarantined."""

    labels: torch.Tensor
    badnet_labels: torch.Tensor
    goodnet_labels: torch.Tensor

    @property
    def disagree(self) -> torch.Tensor:
        return self.badnet_labels != self.goodnet_labels


def ensemble_rule(badnet_labels: torch.Tensor, goodnet_labels: torch.Tensor) -> EnsembleOutput:
    """The answer of sec. 3.3 from both nets' labels: the common label where they agree, the
    GoodNet's where they disagree (which is the GoodNet's label either way); a disagreement
    sends the input to quarantine. Offline simulation and online serving both call this."""
    return EnsembleOutput(
        labels=goodnet_labels, badnet_labels=badnet_labels, goodnet_labels=goodnet_labels
    )


@dataclass
class Ensemble:
    badnet: Net
    goodnet: Net

    def classify(self, images: torch.Tensor) -> EnsembleOutput:
        """Run both nets on uint8 ``images``; the answer is the GoodNet's label (sec. 3.3)."""
        return ensemble_rule(self.badnet.predict(images), self.goodnet.predict(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The ensemble's answers, so it can be measured like a single net."""
        return self.classify(images).labels
