"""The selection rule of sec. 3.2, the provably-equivalent ordered search, and the retraining."""

from __future__ import annotations

import pytest

from models.nets import Net
from nnoculation.pipeline import EDGE_WARNING, report_markdown
from nnoculation.predeploy import (
    DEFAULT_ALPHA_MULTIPLES,
    Cell,
    PredeployConfig,
    PredeployResult,
    eligible,
    retraining_data,
    run_predeploy,
    search_order,
    select_cell,
)
from nnoculation.training import TrainConfig, train
from tests.conftest import synthetic_set

# Table 2 of the paper (BadNet-FSA): rows gamma, columns alpha; baseline CA 91.34 %, theta 3 %.
TABLE2_ALPHAS = (0.001, 0.003, 0.004, 0.005, 0.006)
TABLE2 = {
    0.1: (92.55, 86.79, 85.3, 81.86, 83.9),
    0.2: (93.3, 88.27, 87.53, 80.0, 81.48),
    0.3: (93.39, 88.46, 85.3, 87.72, 83.72),
    0.4: (92.09, 90.41, 86.04, 81.39, 82.41),
    0.5: (92.46, 89.02, 87.06, 82.13, 83.62),
    0.6: (93.58, 88.46, 88.46, 86.13, 84.65),
}


def _table2_cells() -> list[Cell]:
    return [
        Cell(alpha, gamma, ca / 100, 0.0)
        for gamma, row in TABLE2.items()
        for alpha, ca in zip(TABLE2_ALPHAS, row, strict=True)
    ]


def test_rule_reproduces_the_papers_table2_pick() -> None:
    picked = select_cell(_table2_cells(), 0.9134, 0.03)
    assert picked is not None and (picked.alpha, picked.gamma) == (0.004, 0.6)


def test_ordered_search_stops_at_the_rules_pick_on_table2() -> None:
    cells = {(c.alpha, c.gamma): c for c in _table2_cells()}
    visited = []
    for key in search_order(TABLE2_ALPHAS, tuple(TABLE2)):
        visited.append(key)
        if eligible(cells[key], 0.9134, 0.03):
            break
    assert visited[-1] == (0.004, 0.6)
    assert len(visited) == 13  # 6 cells at 0.006, 6 at 0.005, the first at 0.004


def test_no_eligible_cell_gives_none() -> None:
    assert select_cell([Cell(0.1, 0.1, 0.5, 0.0)], 0.9, 0.03) is None


def _tiny_badnet(tiny_net: Net) -> Net:
    train(
        tiny_net,
        synthetic_set(400, seed=1),
        TrainConfig(epochs=3, batch_size=32, lr=3e-3),
        progress=False,
    )
    return tiny_net


def test_search_and_full_grid_pick_the_same_cell(tiny_net: Net) -> None:
    badnet = _tiny_badnet(tiny_net)
    retrain, holdout = synthetic_set(120, seed=2), synthetic_set(80, seed=3)
    base = dict(
        alpha0=1e-3,
        alpha_multiples=(1.0, 30.0),
        gammas=(0.2, 0.4, 0.6),
        epochs=1,
        batch_size=32,
        theta=0.05,
    )
    fast = run_predeploy(badnet, retrain, holdout, PredeployConfig(**base))
    full = run_predeploy(badnet, retrain, holdout, PredeployConfig(**base, full_grid=True))
    assert full.cells_trained == 6
    assert fast.picked is not None and full.picked is not None
    assert (fast.picked.alpha, fast.picked.gamma) == (full.picked.alpha, full.picked.gamma)
    assert fast.picked.holdout_ca == full.picked.holdout_ca
    # The search trained the search order up to its pick, and no further.
    order = search_order(fast.config.alphas, fast.config.gammas)
    pick = order.index((fast.picked.alpha, fast.picked.gamma))
    assert [(c.alpha, c.gamma) for c in fast.cells] == order[: pick + 1]
    assert fast.cells_trained < full.cells_trained
    assert fast.goodnet is not None and fast.goodnet is not badnet
    assert fast.picked.holdout_ca >= fast.baseline_ca - 0.05


def test_retraining_set_is_validation_plus_its_noisy_copy() -> None:
    retrain = synthetic_set(40, seed=4)
    static = retraining_data(retrain, 0.5, seed=0, fresh_noise=False)
    assert not callable(static)
    assert len(static) == 80
    assert static.labels[:40].tolist() == static.labels[40:].tolist()
    assert (static.images[:40] == retrain.images).all()
    # gamma is the share of pixels the noise replaces (A(D, gamma) of sec. 3.2): it must reach
    # the noise, not only make it (0.49-0.51 and 0.09-0.10 over seeds 0-2 on these 40 images).
    for gamma in (0.1, 0.5):
        noisy = retraining_data(retrain, gamma, seed=0, fresh_noise=False)
        assert not callable(noisy)
        changed = float((noisy.images[40:] != retrain.images).float().mean())
        assert changed == pytest.approx(gamma, abs=0.04), (gamma, changed)
    fresh = retraining_data(retrain, 0.5, seed=0, fresh_noise=True)
    assert callable(fresh)
    assert (fresh(0).images[40:] != fresh(1).images[40:]).any(), "fresh noise must change per epoch"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="alpha0 must be positive"):
        PredeployConfig(alpha0=0.0)
    with pytest.raises(ValueError, match="theta is a fraction"):
        PredeployConfig(alpha0=1e-3, theta=3.0)
    assert PredeployConfig(alpha0=1e-3, alpha_multiples=(1, 2)).alphas == (1e-3, 2e-3)


def _result_picking(alpha: float) -> PredeployResult:
    cfg = PredeployConfig(alpha0=1e-3, alpha_multiples=(1.0, 3.0, 6.0), gammas=(0.3,))
    cells = [Cell(a, 0.3, 0.9 if a <= alpha else 0.5, 0.0) for a in cfg.alphas]
    picked = select_cell(cells, 0.9, cfg.theta)
    return PredeployResult(cfg, 0.9, cells, picked, None, 0.0)


def test_default_alpha_grid_reaches_the_papers_6x() -> None:
    assert max(DEFAULT_ALPHA_MULTIPLES) == 6.0  # Table 2's widest multiple


def test_a_pick_at_the_largest_alpha_is_flagged_in_the_result_and_the_report() -> None:
    edge, inner = _result_picking(6e-3), _result_picking(3e-3)
    assert edge.picked is not None and edge.picked.alpha == 6e-3
    assert edge.pick_at_grid_edge and edge.to_dict()["pick_at_grid_edge"] is True
    assert not inner.pick_at_grid_edge and inner.to_dict()["pick_at_grid_edge"] is False
    assert not _result_picking(0.0).pick_at_grid_edge  # no GoodNet: nothing to flag
    check = {"source": "train", "sizes": {"retrain": 1, "holdout": 1, "stream": 1, "test": 1},
             "unseen_ca": None, "warning": None}  # fmt: skip
    for result, flagged in ((edge, True), (inner, False)):
        report = {"attack": None, "floor": None, "validation": check}
        assert (EDGE_WARNING in report_markdown(report, result)) is flagged
