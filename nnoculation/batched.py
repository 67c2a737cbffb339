"""Train several copies of one net at once as a single batched model (``torch.func``).

Pre-deployment retrains the same BadNet once per grid cell. Cells differ only by learning rate
and by their (noisy) training set, so K of them can run as one model whose parameters are
stacked along a new leading dimension: :func:`torch.func.functional_call` under
:func:`torch.func.vmap` turns each convolution into one grouped convolution and each linear
layer into one batched matrix product, and the Python overhead of a training step is paid once
for K cells. That is meant for hardware one small cell leaves idle (a GPU; not measured here).
On this project's 2 CPU cores it did not pay in throwaway A/B runs (no committed benchmark
measures it yet), so the search trains one cell at a time by default.

Every cell still behaves exactly as :func:`nnoculation.training.train` would train it alone:

* its own batch order (a generator seeded with the recipe's seed, as alone), its own epoch
  data (its own noise stream), its own loss (the K losses are summed, so the gradient of cell k
  is the gradient of its own loss);
* its own optimiser state: each cell keeps its own leaf parameters (the batched model stacks
  them in every step, differentiably), and one torch optimiser holds one parameter group per
  cell with that cell's learning rate, so Adam / SGD / Adadelta run their own code unchanged;
* its own buffers (BatchNorm running statistics and batch counters), stacked with the
  parameters and written back to each cell's module;
* dropout draws from torch's global RNG seeded with the recipe's seed, as alone; under vmap
  with ``randomness="same"`` one mask is drawn per step and shared, which is what K cells
  trained alone with the same seed draw as well.

The result equals training the cells one by one up to float rounding (batched kernels add in
another order); ``tests/test_batched_cells.py`` checks weights and running statistics.
TorchScript modules cannot be re-parametrised by ``torch.func`` and are refused by
:func:`batch_refusal`; callers train those one cell at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from models.nets import Net
from nnoculation.data.imageset import ImageSet
from nnoculation.runtime import seeded_rng
from nnoculation.training import EpochData, TrainConfig, make_optimizer


@dataclass(frozen=True)
class CellJob:
    """One copy of the net to train: its learning rate and its training data (a fixed set or
    a per-epoch callback, as :func:`nnoculation.training.train` takes)."""

    lr: float
    data: ImageSet | EpochData


EpochCheck = Callable[[int, list[int], list[Net]], list[bool]]
"""Called after every epoch but the last with (epochs done, indices of the jobs still
training, their nets in eval mode); returns, per job, whether it keeps training."""


@dataclass
class BatchedOutcome:
    """The trained nets (one per job, in job order) and when each one stopped."""

    nets: list[Net]
    epochs_done: list[int]
    seconds: float


def batch_refusal(net: Net) -> str | None:
    """Why ``net`` cannot be trained batched (``None`` when it can)."""
    if isinstance(net.module, torch.jit.ScriptModule):
        return "TorchScript modules cannot be re-parametrised by torch.func"
    if not any(True for _ in net.module.parameters()):
        return "the net has no parameters"
    return None


def train_batched(
    net: Net,
    jobs: Sequence[CellJob],
    cfg: TrainConfig,
    epoch_check: EpochCheck | None = None,
) -> BatchedOutcome:
    """Train one copy of ``net`` per job, all at once; ``net`` itself is not changed.

    ``cfg`` gives epochs, batch size, optimiser, weight decay and seed (its ``lr`` is replaced
    by each job's). ``epoch_check`` may stop some copies early (their nets are returned as they
    were after that epoch). Raises ``ValueError`` when the net cannot be batched
    (:func:`batch_refusal`) or ``jobs`` is empty, and
    :class:`models.exported.NotTrainableError` as :func:`~nnoculation.training.train` does.
    """
    if not jobs:
        raise ValueError("train_batched needs at least one job")
    net.check_trainable()
    reason = batch_refusal(net)
    if reason is not None:
        raise ValueError(f"cannot train this net batched: {reason}")
    if any(job.lr <= 0 for job in jobs):
        raise ValueError("every job needs a positive learning rate")
    device = net.device
    start = time.perf_counter()
    with seeded_rng(cfg.seed, device):
        nets, epochs_done = _train(net, jobs, cfg, device, epoch_check)
    return BatchedOutcome(nets, epochs_done, time.perf_counter() - start)


def _stacked_forward(skeleton: nn.Module, inputs_batched: bool) -> Callable[..., torch.Tensor]:
    def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor):  # type: ignore[no-untyped-def]
        return functional_call(skeleton, (params, buffers), (x,))

    return vmap(one, in_dims=(0, 0, 0 if inputs_batched else None), randomness="same")  # type: ignore[no-any-return]


def _train(
    net: Net,
    jobs: Sequence[CellJob],
    cfg: TrainConfig,
    device: torch.device,
    epoch_check: EpochCheck | None,
) -> tuple[list[Net], list[int]]:
    k_total = len(jobs)
    nets = [net.clone() for _ in jobs]
    skeleton = net.clone().module
    for n in nets:
        n.train_mode(True)
    skeleton.train(True)
    names = [name for name, _ in skeleton.named_parameters()]
    buffer_names = [name for name, _ in skeleton.named_buffers()]
    leaves = [dict(n.module.named_parameters()) for n in nets]
    groups = [{"params": list(leaves[k].values()), "lr": job.lr} for k, job in enumerate(jobs)]
    opt = make_optimizer(groups, cfg)
    gens = [torch.Generator().manual_seed(cfg.seed) for _ in jobs]
    active = list(range(k_total))
    epochs_done = [0] * k_total
    buffers = _stack_buffers(nets, active, buffer_names)
    try:
        for epoch in range(cfg.epochs):
            sets = {k: _epoch_set(jobs[k].data, epoch) for k in active}
            lengths = {len(s) for s in sets.values()}
            if len(lengths) != 1:
                raise ValueError("batched cells need training sets of one length")
            orders = {k: torch.randperm(len(sets[k]), generator=gens[k]) for k in active}
            first = active[0]
            shared = all(
                sets[k].images is sets[first].images and torch.equal(orders[k], orders[first])
                for k in active
            )
            forward = _stacked_forward(skeleton, inputs_batched=not shared)
            length = lengths.pop()
            for i in range(0, length, cfg.batch_size):
                params = {name: torch.stack([leaves[k][name] for k in active]) for name in names}
                if shared:
                    idx = orders[first][i : i + cfg.batch_size]
                    x = net.spec.to_model_input(sets[first].images[idx].to(device))
                else:
                    x = torch.stack(
                        [
                            net.spec.to_model_input(
                                sets[k].images[orders[k][i : i + cfg.batch_size]].to(device)
                            )
                            for k in active
                        ]
                    )
                y = torch.stack(
                    [sets[k].labels[orders[k][i : i + cfg.batch_size]].to(device) for k in active]
                )
                out = forward(params, buffers, x)  # [K, B, classes]
                # The sum of per-cell mean losses: cell k's gradient is its own loss's gradient.
                loss = (
                    F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
                    .view(len(active), -1)
                    .mean(dim=1)
                    .sum()
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for k in active:
                epochs_done[k] = epoch + 1
            if epoch_check is not None and epoch + 1 < cfg.epochs:
                _unstack_buffers(nets, active, buffers)
                for n in nets:
                    n.train_mode(False)
                keep = epoch_check(epoch + 1, list(active), [nets[k] for k in active])
                for n in nets:
                    n.train_mode(True)
                if len(keep) != len(active):
                    raise ValueError("epoch_check must answer once per job still training")
                active = [k for k, kept in zip(active, keep, strict=True) if kept]
                if not active:
                    break
                buffers = _stack_buffers(nets, active, buffer_names)
        else:
            _unstack_buffers(nets, active, buffers)
    finally:
        for n in nets:
            n.train_mode(False)
    return nets, epochs_done


def _epoch_set(data: ImageSet | EpochData, epoch: int) -> ImageSet:
    return data if isinstance(data, ImageSet) else data(epoch)


def _stack_buffers(nets: list[Net], active: list[int], names: list[str]) -> dict[str, torch.Tensor]:
    per_net = [dict(nets[k].module.named_buffers()) for k in active]
    return {name: torch.stack([b[name] for b in per_net]) for name in names}


def _unstack_buffers(nets: list[Net], active: list[int], buffers: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for row, k in enumerate(active):
            own = dict(nets[k].module.named_buffers())
            for name, stacked in buffers.items():
                own[name].copy_(stacked[row])
