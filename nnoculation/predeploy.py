"""Pre-deployment defense (sec. 3.2): retrain the BadNet on clean + noise-augmented
validation data over a grid of learning rates alpha and noise fractions gamma, and pick the
GoodNet by the paper's rule:

  (i)   keep cells whose clean accuracy is within theta of the BadNet's,
  (ii)  of those, keep the ones with the largest alpha,
  (iii) of those, pick the one with the largest gamma.

The grid is visited largest alpha first and, within an alpha, largest gamma first; the first
cell that passes (i) is then provably the one the rule picks over the whole grid, so the
remaining cells need not be trained. ``full_grid`` trains every cell (to draw the paper's
Figure 4 / Table 2) and applies the same rule to the finished grid.

Three ways to get there faster:

* ``workers = W`` trains W cells of the search order side by side in W worker processes on a
  CPU (:mod:`nnoculation.cell_pool`) and takes them back in search order, so the pick is the
  same cell; cells after the pick that were already in flight are discarded.

* ``cells_at_once = K`` trains K consecutive cells of the search order together as one batched
  model (:mod:`nnoculation.batched`); each gives the weights it would get alone (to float
  rounding), the batch is evaluated together and the pick is still the first eligible cell in
  search order, so the answer is the whole grid's. Cells after the pick in its batch were
  trained speculatively. It is meant for hardware one cell leaves idle (a GPU, not measured
  here); on 2 CPU cores it was slower than one cell at a time in throwaway runs (no committed
  benchmark yet), so the default is 1.
* ``prune_margin = m`` (not provably exact, off by default and refused under ``exact``) stops a
  cell after an epoch when its hold-out CA is more than ``m`` below the eligibility bar; such a
  cell counts as not eligible. ``track_epochs`` records every cell's hold-out CA after every
  epoch, from which a whole-grid run measures the false-stop rate of any margin
  (:func:`false_stops`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from models.nets import Net
from nnoculation.batched import CellJob, batch_refusal, train_batched
from nnoculation.cell_pool import cells_in_order
from nnoculation.data.imageset import ImageSet
from nnoculation.metrics import Evaluation, clean_accuracy, evaluate
from nnoculation.noise import generator_for, noise_augment
from nnoculation.training import Optimizer, TrainConfig, train

if TYPE_CHECKING:  # annotations only: importing this module must not load the attack suite
    from nnoculation.metrics import EvalAttack  # a catalog AttackSpec or a user's triggered set

DEFAULT_GAMMAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # sec. 4.2.1: 10 %..60 % in steps of 10
# sec. 4.2.1: alpha0 "increased in multiples"; the paper's Table 2 goes to 6x, and so does the
# default. (It stopped at 5x until a review found four of six Fashion-MNIST picks at 5x: at the
# grid's edge, where a wider grid might have picked a larger alpha.) A pick at the largest alpha
# is flagged (:attr:`PredeployResult.pick_at_grid_edge`): widen ``alpha_multiples`` then.
DEFAULT_ALPHA_MULTIPLES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
DEFAULT_THETA = 0.03  # sec. 5: "with 3% Threshold"
DEFAULT_CELL_EPOCHS = 4  # retraining epochs per grid cell (8,000 images each on Fashion-MNIST)


@dataclass(frozen=True)
class PredeployConfig:
    """Everything that defines a pre-deployment search; serialised into the report."""

    alpha0: float
    optimizer: Optimizer = "adam"
    theta: float = DEFAULT_THETA
    alpha_multiples: tuple[float, ...] = DEFAULT_ALPHA_MULTIPLES
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    epochs: int = DEFAULT_CELL_EPOCHS
    batch_size: int = 64
    fresh_noise: bool = False  # the paper uses one static noisy copy; True redraws per epoch
    full_grid: bool = False
    seed: int = 0
    cells_at_once: int = 1  # cells trained together as one batched model (1: one at a time)
    workers: int = 1  # processes training cells side by side on a CPU (nnoculation.cell_pool)
    exact: bool = False  # no shortcut that is not provably exact (prune_margin refused)
    prune_margin: float | None = None  # stop a cell this far below the bar (None: never)
    track_epochs: bool = False  # record every cell's hold-out CA after every epoch

    def __post_init__(self) -> None:
        if self.alpha0 <= 0:
            raise ValueError("alpha0 must be positive")
        if not 0 <= self.theta < 1:
            raise ValueError("theta is a fraction of accuracy in [0, 1), e.g. 0.03")
        if any(not 0 <= g <= 1 for g in self.gammas):
            raise ValueError("every gamma must lie in [0, 1]")
        if not self.alpha_multiples or not self.gammas:
            raise ValueError("the grid needs at least one alpha multiple and one gamma")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")
        if self.cells_at_once < 1:
            raise ValueError("cells_at_once must be at least 1")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.workers > 1 and self.cells_at_once > 1:
            raise ValueError("choose workers or cells_at_once: batched cells run in one process")
        if self.prune_margin is not None:
            if self.exact:
                raise ValueError(
                    "prune_margin is a shortcut that is not provably exact; it cannot be "
                    "combined with exact"
                )
            if self.full_grid:
                raise ValueError("full_grid trains every cell to the end; drop prune_margin")
            if not 0 <= self.prune_margin <= 1:
                raise ValueError("prune_margin is a fraction of accuracy in [0, 1], e.g. 0.2")

    @property
    def mode(self) -> str:
        """What ran, for reports: ``full-grid``, ``exact`` or ``pruned (margin m)``."""
        if self.full_grid:
            return "full-grid"
        if self.prune_margin is None:
            return "exact"
        return f"pruned (margin {self.prune_margin:g})"

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(sorted({self.alpha0 * m for m in self.alpha_multiples}))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["alphas"] = list(self.alphas)
        data["mode"] = self.mode
        return data


@dataclass
class Cell:
    """One trained grid point: its hold-out CA decides selection; test metrics are reporting.

    ``seconds`` is the cell's share of the training time (a batch of cells splits its time
    evenly). ``epoch_cas`` holds the hold-out CA after each epoch when recorded; a cell stopped
    by ``prune_margin`` has ``pruned_after`` set and is never eligible.
    """

    alpha: float
    gamma: float
    holdout_ca: float
    seconds: float
    test: Evaluation | None = None
    epoch_cas: list[float] | None = None
    pruned_after: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "alpha": self.alpha,
            "gamma": self.gamma,
            "holdout_ca": self.holdout_ca,
            "seconds": self.seconds,
        }
        if self.epoch_cas is not None:
            data["epoch_cas"] = self.epoch_cas
        if self.pruned_after is not None:
            data["pruned_after"] = self.pruned_after
        if self.test is not None:
            data["test"] = self.test.to_dict()
        return data


def eligible(cell: Cell, baseline_ca: float, theta: float) -> bool:
    """Rule (i): the cell's CA is within theta of the BadNet's (a pruned cell never is)."""
    return cell.pruned_after is None and cell.holdout_ca >= baseline_ca - theta


def prune_bar(baseline_ca: float, theta: float, margin: float) -> float:
    """Hold-out CA below which ``prune_margin = margin`` stops a cell after an epoch."""
    return baseline_ca - theta - margin


def false_stops(
    cells: list[Cell], baseline_ca: float, theta: float, margin: float
) -> dict[str, Any]:
    """What ``prune_margin = margin`` would have done on a finished grid with ``epoch_cas``.

    A *false stop* is a cell that would have been stopped after some epoch before the last but
    ends eligible. Returns the cells it would stop, the false stops (as ``[alpha, gamma]``),
    their rate among the eligible cells, the epochs it saves, and its pick
    (``[alpha, gamma]`` or ``None``): the first cell in search order that is eligible and not
    stopped, which differs from the rule's pick only if that cell was falsely stopped.
    """
    bar = prune_bar(baseline_ca, theta, margin)
    stopped, false, saved = [], [], 0
    for c in cells:
        if c.epoch_cas is None:
            raise ValueError("false_stops needs cells trained with track_epochs")
        early = [k for k, ca in enumerate(c.epoch_cas[:-1], start=1) if ca < bar]
        if early:
            stopped.append(c)
            saved += len(c.epoch_cas) - early[0]
            if eligible(c, baseline_ca, theta):
                false.append([c.alpha, c.gamma])
    kept = [c for c in cells if c not in stopped]
    pick = select_cell(kept, baseline_ca, theta)
    n_eligible = sum(eligible(c, baseline_ca, theta) for c in cells)
    return {
        "margin": margin,
        "stopped": len(stopped),
        "false_stops": false,
        "false_stop_rate": len(false) / n_eligible if n_eligible else 0.0,
        "epochs_saved": saved,
        "epochs_total": sum(len(c.epoch_cas or []) for c in cells),
        "pick": None if pick is None else [pick.alpha, pick.gamma],
    }


def select_cell(cells: list[Cell], baseline_ca: float, theta: float) -> Cell | None:
    """The paper's rule over a finished grid: eligible cells, largest alpha, then largest gamma."""
    passing = [c for c in cells if eligible(c, baseline_ca, theta)]
    return max(passing, key=lambda c: (c.alpha, c.gamma), default=None)


def search_order(alphas: tuple[float, ...], gammas: tuple[float, ...]) -> list[tuple[float, float]]:
    """Largest alpha first, then largest gamma: the first eligible cell is the rule's pick."""
    return [(a, g) for a in sorted(alphas, reverse=True) for g in sorted(gammas, reverse=True)]


@dataclass
class PredeployResult:
    config: PredeployConfig
    baseline_ca: float
    cells: list[Cell]
    picked: Cell | None
    goodnet: Net | None
    seconds: float  # wall seconds of the search itself (evaluation for reports excluded)
    badnet_test: Evaluation | None = None
    goodnet_test: Evaluation | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cells_trained(self) -> int:
        return len(self.cells)

    @property
    def pick_at_grid_edge(self) -> bool:
        """The pick has the grid's largest alpha: a wider grid might pick a larger one, so the
        rule's "largest alpha" is only the largest *tried* (widen ``alpha_multiples``)."""
        return self.picked is not None and self.picked.alpha == max(self.config.alphas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "mode": self.config.mode,
            "baseline_ca": self.baseline_ca,
            "picked": None if self.picked is None else self.picked.to_dict(),
            "cells_trained": self.cells_trained,
            "pick_at_grid_edge": self.pick_at_grid_edge,
            "grid_size": len(self.config.alphas) * len(self.config.gammas),
            "seconds": self.seconds,
            "cells": [c.to_dict() for c in self.cells],
            "badnet_test": None if self.badnet_test is None else self.badnet_test.to_dict(),
            "goodnet_test": None if self.goodnet_test is None else self.goodnet_test.to_dict(),
            **self.extra,
        }


GAMMA_SEED_STRIDE = 1000  # seed * stride + gamma in percent: one noise stream per gamma


def _gamma_seed(seed: int, gamma: float) -> int:
    # The same gamma gets the same noisy copy at every alpha, so cells differ only by alpha.
    return seed * GAMMA_SEED_STRIDE + round(gamma * 100)


def retraining_data(
    retrain: ImageSet, gamma: float, seed: int, fresh_noise: bool
) -> ImageSet | Callable[[int], ImageSet]:
    """D_valid U A(D_valid, eta, gamma): a static noisy copy, or a fresh one every epoch."""
    if not fresh_noise:
        noisy = noise_augment(retrain.images, gamma, generator_for(_gamma_seed(seed, gamma)))
        return ImageSet.concat([retrain, retrain.with_images(noisy)])
    g = generator_for(_gamma_seed(seed, gamma))
    return lambda _epoch: ImageSet.concat(
        [retrain, retrain.with_images(noise_augment(retrain.images, gamma, g))]
    )


def cell_recipe(alpha: float, cfg: PredeployConfig) -> TrainConfig:
    """The training recipe of a cell at learning rate ``alpha``."""
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=alpha,
        optimizer=cfg.optimizer,
        seed=cfg.seed,
    )


def train_cell(
    badnet: Net,
    retrain: ImageSet,
    alpha: float,
    gamma: float,
    cfg: PredeployConfig,
    on_epoch_end: Callable[[int, Net], None] | None = None,
    progress: bool = True,
) -> Net:
    """Retrain a copy of the BadNet at learning rate ``alpha`` and noise fraction ``gamma``.

    ``on_epoch_end(epochs_done, net)`` runs after every epoch (the net in eval mode for its
    duration); an exception it raises stops training. ``progress``: a per-epoch bar.
    """
    net = badnet.clone()
    data = retraining_data(retrain, gamma, cfg.seed, cfg.fresh_noise)
    hook = None
    if on_epoch_end is not None:
        callback = on_epoch_end

        def hook(done: int, _logs: dict[str, float]) -> None:
            net.train_mode(False)
            try:
                callback(done, net)
            finally:
                net.train_mode(True)

    train(
        net,
        data,
        cell_recipe(alpha, cfg),
        desc=f"alpha={alpha:.4g} gamma={gamma:.0%}",
        progress=progress,
        on_epoch_end=hook,
    )
    return net


class _Stop(Exception):
    """Raised by the pruning hook to end a cell's training."""


def train_group(
    badnet: Net,
    retrain: ImageSet,
    holdout: ImageSet,
    group: list[tuple[float, float]],
    cfg: PredeployConfig,
    bar: float | None,
    batched: bool,
    progress: bool = True,
) -> list[tuple[Cell, Net | None]]:
    """Train the cells of ``group`` (together when ``batched``), returning them with their
    hold-out CA; with ``bar`` a cell whose hold-out CA falls below it after an epoch before the
    last stops there (``pruned_after``, and its net is ``None``: it can never be picked)."""
    track = cfg.track_epochs or bar is not None
    history: dict[int, list[float]] = {k: [] for k in range(len(group))}
    pruned: dict[int, int] = {}
    nets: list[Net | None] = []
    seconds: list[float] = []
    if batched:
        # Cells of one gamma share one static noisy copy (the same tensors), so the batched
        # model feeds them one input batch; fresh noise needs a stream per cell.
        if cfg.fresh_noise:
            jobs = [
                CellJob(alpha, retraining_data(retrain, gamma, cfg.seed, True))
                for alpha, gamma in group
            ]
        else:
            static = {
                gamma: retraining_data(retrain, gamma, cfg.seed, False)
                for gamma in dict.fromkeys(g for _, g in group)
            }
            jobs = [CellJob(alpha, static[gamma]) for alpha, gamma in group]

        def check(done: int, active: list[int], trained: list[Net]) -> list[bool]:
            keep = []
            for k, net in zip(active, trained, strict=True):
                ca = clean_accuracy(net, holdout)
                history[k].append(ca)
                stop = bar is not None and ca < bar
                if stop:
                    pruned[k] = done
                keep.append(not stop)
            return keep

        outcome = train_batched(
            badnet, jobs, cell_recipe(group[0][0], cfg), check if track else None
        )
        # A stopped cell can never be picked: drop its net as a lone run does.
        nets.extend(None if k in pruned else n for k, n in enumerate(outcome.nets))
        seconds = [outcome.seconds / len(group)] * len(group)
    else:
        for k, (alpha, gamma) in enumerate(group):
            t1 = time.perf_counter()

            def on_epoch(done: int, net: Net, k: int = k) -> None:
                if done == cfg.epochs:
                    return  # the final CA is measured below
                ca = clean_accuracy(net, holdout)
                history[k].append(ca)
                if bar is not None and ca < bar:
                    pruned[k] = done
                    raise _Stop

            try:
                nets.append(
                    train_cell(
                        badnet, retrain, alpha, gamma, cfg, on_epoch if track else None, progress
                    )
                )
            except _Stop:
                nets.append(None)
            seconds.append(time.perf_counter() - t1)
    cells: list[tuple[Cell, Net | None]] = []
    for k, ((alpha, gamma), net) in enumerate(zip(group, nets, strict=True)):
        ca = history[k][-1] if net is None else clean_accuracy(net, holdout)
        if track and k not in pruned:
            history[k].append(ca)
        cell = Cell(alpha, gamma, ca, seconds[k], epoch_cas=history[k] if track else None)
        cell.pruned_after = pruned.get(k)
        cells.append((cell, net))
    return cells


def run_predeploy(
    badnet: Net,
    retrain: ImageSet,
    holdout: ImageSet,
    cfg: PredeployConfig,
    test: ImageSet | None = None,
    attack: EvalAttack | None = None,
    on_cell: Callable[[Cell], None] | None = None,
) -> PredeployResult:
    """Search the grid and return the GoodNet (or ``goodnet=None`` when no cell is within theta).

    ``test`` and ``attack`` are for evaluation only: they never influence the choice. A BadNet
    that cannot be retrained with training behaviour is refused before any cell is trained
    (:class:`models.exported.NotTrainableError`).
    """
    badnet.check_trainable()
    batched = cfg.cells_at_once > 1 and batch_refusal(badnet) is None
    start = time.perf_counter()
    evaluation_seconds = 0.0  # evaluation-only work, kept out of the search's cost
    baseline_ca = clean_accuracy(badnet, holdout)
    bar = None if cfg.prune_margin is None else prune_bar(baseline_ca, cfg.theta, cfg.prune_margin)
    order = search_order(cfg.alphas, cfg.gammas)
    size = cfg.cells_at_once if batched else 1
    workers = min(cfg.workers, len(order))  # a one-cell grid needs no pool
    pooled = workers > 1
    if pooled:  # one cell per group, in search order, from the worker processes
        stream = cells_in_order(
            badnet, retrain, holdout, order, cfg, bar, baseline_ca, keep_all=test is not None
        )
        groups: Iterator[list[tuple[Cell, Net | None]]] = ([item] for item in stream)
    else:
        groups = (
            train_group(badnet, retrain, holdout, order[first : first + size], cfg, bar, batched)
            for first in range(0, len(order), size)
        )
    cells: list[Cell] = []
    nets: dict[tuple[float, float], Net] = {}
    try:
        for group in groups:
            found = False
            for cell, net in group:
                if test is not None and net is not None:
                    t1 = time.perf_counter()
                    cell.test = evaluate(net, test, attack)
                    evaluation_seconds += time.perf_counter() - t1
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
                if net is not None and eligible(cell, baseline_ca, cfg.theta):
                    found = True
                    if select_cell(cells, baseline_ca, cfg.theta) is cell:
                        nets = {(cell.alpha, cell.gamma): net}
            if found and not cfg.full_grid:
                break  # the first eligible cell in search order is the whole grid's pick
    finally:
        if pooled:
            stream.close()  # stops the workers: cells still in flight are discarded
    picked = select_cell(cells, baseline_ca, cfg.theta)
    goodnet = None if picked is None else nets[(picked.alpha, picked.gamma)]
    result = PredeployResult(
        extra={"cells_at_once": size, "batched": batched, "workers": workers},
        config=cfg,
        baseline_ca=baseline_ca,
        cells=cells,
        picked=picked,
        goodnet=goodnet,
        seconds=time.perf_counter() - start - evaluation_seconds,
    )
    if test is not None:
        result.badnet_test = evaluate(badnet, test, attack)
        result.goodnet_test = picked.test if picked is not None else None
    return result


def grid_table(
    cells: list[Cell], key: Callable[[Cell], float | None]
) -> tuple[list[float], list[float], list[list[float | None]]]:
    """Rows = gammas, columns = alphas (as in Table 2); missing cells are ``None``."""
    alphas = sorted({c.alpha for c in cells})
    gammas = sorted({c.gamma for c in cells})
    lookup = {(c.alpha, c.gamma): key(c) for c in cells}
    return alphas, gammas, [[lookup.get((a, g)) for a in alphas] for g in gammas]
