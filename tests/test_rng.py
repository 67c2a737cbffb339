"""Library calls leave the caller's global RNG alone and stay deterministic for a seed."""

from __future__ import annotations

import torch

from models.cyclegan import get_profile
from models.nets import Net
from nnoculation.repair.cyclegan import train_cyclegan
from nnoculation.training import TrainConfig, train
from tests.conftest import synthetic_set

RECIPE = TrainConfig(epochs=1, batch_size=16, lr=1e-3, seed=5)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_keeps_the_global_rng_and_is_deterministic(tiny_net: Net) -> None:
    tiny_net.module.classifier[3].p = 0.5  # dropout: training draws from the global RNG
    data = synthetic_set(48, seed=1)
    start = _weights(tiny_net.module)
    results = []
    for global_seed in (123, 456):
        torch.manual_seed(global_seed)
        torch.rand(3)
        before = torch.get_rng_state()
        tiny_net.module.load_state_dict(start)
        train(tiny_net, data, RECIPE, progress=False)
        assert torch.equal(torch.get_rng_state(), before)
        results.append(_weights(tiny_net.module))
    assert _same(results[0], results[1])  # the caller's RNG state does not leak in either


def test_train_cyclegan_keeps_the_global_rng_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 255, (8, 1, 12, 12), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 255, (8, 1, 12, 12), generator=g, dtype=torch.uint8)
    results = []
    for global_seed in (123, 456):
        torch.manual_seed(global_seed)
        torch.rand(3)
        before = torch.get_rng_state()
        result = train_cyclegan(a, b, get_profile("test"), seed=2, epochs=1, progress=False)
        assert torch.equal(torch.get_rng_state(), before)
        results.append(_weights(result.generator))
    assert _same(results[0], results[1])
