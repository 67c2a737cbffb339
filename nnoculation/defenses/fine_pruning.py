"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018), a baseline of the paper's Table 5.

The defender prunes the channels of the BadNet's last convolutional layer in increasing order
of their mean activation on clean validation data (the ``retrain`` split), one ``step`` at a
time, until the hold-out clean accuracy would fall more than ``max_ca_drop`` below the
unpruned net's (Liu et al. stop at a 4-point drop; the NNoculation paper uses their reference
implementation and names no other value), keeping the last pruning that stayed within that
bound; then it fine-tunes the pruned net on the ``retrain`` split.

A channel is pruned by a forward hook that multiplies the layer's output by a 0/1 mask, so
any zoo net works without rewriting its layers (where a BatchNorm of the same width directly
follows the convolution, the mask sits on the BatchNorm's output, else a pruned channel would
still carry the BatchNorm's shift). The mask stays on during fine-tuning, so pruned channels
stay pruned. TorchScript and ``torch.export`` nets expose no layer that can be hooked and are
refused with a ``ValueError``.
"""

from __future__ import annotations

from typing import Any, ClassVar, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from models.nets import Net
from nnoculation.data.imageset import ImageSet
from nnoculation.defenses.base import Defended, DefenseInputs, register, timed
from nnoculation.metrics import Predictor, clean_accuracy
from nnoculation.training import Optimizer, TrainConfig, train

DEFAULT_MAX_CA_DROP = 0.04  # Liu et al.: prune until validation accuracy has dropped by 4 %
DEFAULT_EPOCHS = 5
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 64
ACTIVATION_BATCH = 512


class ChannelMask:
    """A forward hook zeroing the pruned output channels of a layer (``mask`` is 0/1 per
    channel). A plain object, so ``copy.deepcopy`` of the module copies the mask with it."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.mask = torch.ones(channels, device=device)

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.mask.view(1, -1, 1, 1).to(output.dtype)


def last_conv(net: Net) -> tuple[str, nn.Module, int]:
    """The layer to prune: ``(name, module to mask, channels)``.

    The last ``nn.Conv2d`` in the module's registration order, or the ``nn.BatchNorm2d`` of the
    same width registered right after it. ``ValueError`` for TorchScript / ``torch.export``
    nets and for nets without a convolution.
    """
    if net.format != "zoo":
        raise ValueError(
            f"fine-pruning needs the BadNet's last convolutional layer, which a {net.format} "
            "net does not expose as a module that can be masked; use a zoo net "
            "(architecture name + weights)"
        )
    modules = list(net.module.named_modules())
    found = None
    for i, (_name, module) in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            found = i
    if found is None:
        raise ValueError("fine-pruning found no convolutional layer (nn.Conv2d) in the net")
    name, conv = modules[found]
    channels = int(conv.out_channels)  # type: ignore[arg-type]
    if found + 1 < len(modules):
        next_name, following = modules[found + 1]
        if isinstance(following, nn.BatchNorm2d) and following.num_features == channels:
            return next_name, following, channels
    return name, conv, channels


def mean_activations(net: Net, layer: nn.Module, data: ImageSet) -> torch.Tensor:
    """Mean activation of each output channel of ``layer`` on ``data`` (after a ReLU, as the
    activations Liu et al. rank), in eval mode and without gradients."""
    total: torch.Tensor | None = None

    def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal total
        part = output.detach().float().clamp_min(0).sum(dim=(0, 2, 3)).cpu()
        total = part if total is None else total + part

    handle = layer.register_forward_hook(record)
    try:
        net.scores(data.images, batch_size=ACTIVATION_BATCH)
    finally:
        handle.remove()
    if total is None:
        raise ValueError("no clean images to rank channels by")
    return total / len(data)


@register
class FinePruning:
    """Prune the last conv layer's least active channels, then fine-tune (see module doc)."""

    name: ClassVar[str] = "fine-pruning"

    def __init__(
        self,
        max_ca_drop: float = DEFAULT_MAX_CA_DROP,
        epochs: int = DEFAULT_EPOCHS,
        lr: float = DEFAULT_LR,
        optimizer: Optimizer = "adam",
        batch_size: int = DEFAULT_BATCH_SIZE,
        step: int = 1,
        progress: bool = True,
    ) -> None:
        if not 0.0 < max_ca_drop < 1.0:
            raise ValueError(f"max_ca_drop is a fraction in (0, 1), got {max_ca_drop}")
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if optimizer not in get_args(Optimizer):
            raise ValueError(f"unknown optimizer {optimizer!r}")
        if batch_size < 1 or step < 1:
            raise ValueError(f"batch_size and step must be >= 1, got {batch_size}, {step}")
        self.max_ca_drop, self.epochs, self.lr = max_ca_drop, epochs, lr
        self.optimizer: Optimizer = optimizer
        self.batch_size, self.step, self.progress = batch_size, step, progress

    def run(self, inputs: DefenseInputs) -> Defended:
        """Prune a copy of ``inputs.badnet`` and fine-tune it; the BadNet itself is untouched."""
        last_conv(inputs.badnet)  # refuses TorchScript / .pt2 / conv-less nets before any work
        net = inputs.badnet.clone()
        layer_name, layer, channels = last_conv(net)  # a zoo net: always trainable
        if len(inputs.retrain) == 0 or len(inputs.holdout) == 0:
            raise ValueError("fine-pruning needs clean retrain and hold-out images")
        return timed(lambda: self._run(net, layer_name, layer, channels, inputs), self.name)

    def _run(
        self, net: Net, layer_name: str, layer: nn.Module, channels: int, inputs: DefenseInputs
    ) -> tuple[Predictor, dict[str, Any]]:
        activations = mean_activations(net, layer, inputs.retrain)
        order = [int(i) for i in torch.argsort(activations, stable=True)]
        hook = ChannelMask(channels, net.device)
        layer.register_forward_hook(hook)
        baseline = clean_accuracy(net, inputs.holdout)
        floor = baseline - self.max_ca_drop
        ca_steps, kept_ca = [baseline], baseline
        bar = tqdm(
            total=channels,
            desc="fine-pruning: prune",
            disable=None if self.progress else True,
            leave=False,
            unit="ch",
        )
        try:
            for start in range(0, channels, self.step):
                batch = order[start : start + self.step]
                hook.mask[batch] = 0.0
                ca = clean_accuracy(net, inputs.holdout)
                ca_steps.append(ca)
                bar.update(len(batch))
                bar.set_postfix(ca=f"{ca:.3f}")
                if ca < floor:
                    hook.mask[batch] = 1.0  # undo the step that crossed the bound
                    break
                kept_ca = ca
        finally:
            bar.close()
        pruned = [c for c in order if hook.mask[c] == 0]
        details: dict[str, Any] = {
            "layer": layer_name,
            "channels": channels,
            "pruned": pruned,
            "pruned_count": len(pruned),
            "max_ca_drop": self.max_ca_drop,
            "baseline_holdout_ca": baseline,
            "pruned_holdout_ca": kept_ca,
            "ca_steps": ca_steps,
            "step": self.step,
            "mean_activation": [float(a) for a in activations],
        }
        cfg = TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            seed=inputs.seed,
        )
        if self.epochs:
            stats = train(
                net, inputs.retrain, cfg, desc="fine-pruning: fine-tune", progress=self.progress
            )
            details["finetune"] = {
                **cfg.to_dict(),
                "seconds": stats.seconds,
                "final_loss": stats.final_loss,
                "holdout_ca": clean_accuracy(net, inputs.holdout),
            }
        else:
            details["finetune"] = None
        return net, details
