"""Stream simulation: the attacker's stream, the ensemble's quarantine, precision / recall."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.bundle import load_bundle
from models.nets import Net
from nnoculation.ensemble import Ensemble
from nnoculation.stream import StreamConfig, make_stream, simulate_stream
from tests.conftest import synthetic_set
from tests.deployment_fixtures import make_deployment, patch_attack, triggered


def test_stream_poisons_the_asked_ratio_and_spares_target_labels() -> None:
    pool = synthetic_set(2000, seed=1)
    attack = patch_attack()
    images, poisoned = make_stream(pool, attack, StreamConfig(poison_ratio=0.3, seed=2))
    assert images.dtype == torch.uint8 and images.shape == pool.images.shape
    # Target 0 holds a quarter of the pool and is never poisoned: 0.3 * 0.75 overall.
    assert abs(poisoned.float().mean().item() - 0.3 * 0.75) < 0.03
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(2))
    changed = (images != pool.images[order]).flatten(1).any(dim=1)
    assert torch.equal(changed, poisoned), "exactly the poisoned inputs carry the trigger"
    assert not (poisoned & (pool.labels[order] == 0)).any()
    again, _ = make_stream(pool, attack, StreamConfig(poison_ratio=0.3, seed=2))
    assert torch.equal(images, again)


def test_ensemble_answers_goodnet_and_flags_disagreement(tiny_net: Net, tmp_path: Path) -> None:
    path, attack, test = make_deployment(tiny_net, tmp_path)
    bundle = load_bundle(path)
    badnet, goodnet = bundle.net("badnet"), bundle.net("goodnet")
    images = torch.cat([test.images[:32], triggered(attack, test.images[:32])])
    bad, good = badnet.predict(images), goodnet.predict(images)  # each net on its own
    assert int((bad != good).sum()) >= 8, "the check needs inputs on which the nets part ways"
    out = Ensemble(badnet, goodnet).classify(images)
    assert torch.equal(out.labels, good), "the answer is the GoodNet's label"
    assert torch.equal(out.goodnet_labels, good) and torch.equal(out.badnet_labels, bad)
    assert torch.equal(out.disagree, bad != good)
    assert torch.equal(Ensemble(badnet, goodnet).predict(images), good)
    # the nets swapped answer differently, so the checks above tell BadNet from GoodNet
    assert not torch.equal(Ensemble(goodnet, badnet).classify(images).labels, good)


def test_quarantine_fills_to_n_with_poisoned_inputs(tiny_net: Net, tmp_path: Path) -> None:
    path, attack, _ = make_deployment(tiny_net, tmp_path)
    bundle = load_bundle(path)
    ensemble = Ensemble(bundle.net("badnet"), bundle.net("goodnet"))
    cfg = StreamConfig(poison_ratio=0.5, quarantine_size=40, batch_size=16, seed=3)
    pool = synthetic_set(800, seed=6)
    result = simulate_stream(ensemble, pool, attack, cfg)
    assert result.images.shape == (40, 1, 12, 12)
    # Worked out independently: the stream, the nets' disagreements batch by batch, and the
    # position of the 40th disagreement (the input that fills the quarantine).
    images, poisoned = make_stream(pool, attack, cfg)
    split = torch.cat([ensemble.classify(images[i : i + 16]).disagree for i in range(0, 800, 16)])
    fortieth = int(torch.nonzero(split).flatten()[39])
    assert result.caught_n_after == result.inputs_seen == fortieth + 1
    assert result.poisoned_seen == int(poisoned[: fortieth + 1].sum())
    assert torch.equal(result.images, images[torch.nonzero(split).flatten()[:40]])
    assert result.precision > 0.7, result.summary()
    assert result.recall > 0.5, result.summary()
    # every quarantined input is one the two nets, run on their own, disagree on
    assert torch.equal(result.badnet_labels, bundle.net("badnet").predict(result.images))
    assert torch.equal(result.goodnet_labels, bundle.net("goodnet").predict(result.images))
    assert bool((result.badnet_labels != result.goodnet_labels).all())
    saved = result.save_npz(tmp_path / "q.npz")
    with np.load(saved) as data:
        assert data["images"].shape == (40, 12, 12, 1)
        assert data["eval_poisoned"].sum() == int(result.poisoned.sum())
