"""The cell-cost benchmark's library patches: inside the block a cell's copy of the net and its
optimizer are the variant being timed; after it (also after an error) the library is as it was,
so a later measurement of the same run times the plain code."""

from __future__ import annotations

import pytest
import torch

from models.nets import Net
from nnoculation import training
from nnoculation.benchmarks.cell_cost import cloned_as, fused_adam


def last_conv(net: Net) -> torch.Tensor:
    """A conv weight with several input channels (with one, both memory layouts coincide)."""
    return [p for p in net.module.parameters() if p.dim() == 4][-1]


def test_cloned_as_transforms_every_clone_and_restores_clone(tiny_net: Net) -> None:
    plain = Net.clone
    with cloned_as(lambda m: m.to(memory_format=torch.channels_last)):
        conv = last_conv(tiny_net.clone())
        assert conv.is_contiguous(memory_format=torch.channels_last)
    assert Net.clone is plain
    with pytest.raises(RuntimeError), cloned_as(lambda m: m):
        raise RuntimeError("a failed measurement")
    assert Net.clone is plain
    conv = last_conv(tiny_net.clone())
    assert not conv.is_contiguous(memory_format=torch.channels_last)


def test_fused_adam_only_inside_the_block_and_only_for_adam(tiny_net: Net) -> None:
    params = list(tiny_net.module.parameters())
    adam, sgd = training.TrainConfig(optimizer="adam"), training.TrainConfig(optimizer="sgd")
    with fused_adam():
        assert training.make_optimizer(params, adam).defaults["fused"] is True
        assert isinstance(training.make_optimizer(params, sgd), torch.optim.SGD)
    assert not training.make_optimizer(params, adam).defaults["fused"]
