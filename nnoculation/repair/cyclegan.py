"""CycleGAN training for the post-deployment stage (sec. 3.3, sec. 4.2.2, appendix A.3).

Domain A holds clean validation images, domain B the quarantined ones; the generator ``G_AB``
learns to add the attacker's trigger, and ``G_AB(validation)`` becomes the treatment set. The
loop is the CycleGAN of Zhu et al.: LSGAN losses, cycle and identity L1 terms, a halved
discriminator objective, an image history buffer per discriminator and Adam with a learning
rate held constant and then decayed linearly to zero. A profile's ``step_order`` picks the
order of one step: Zhu et al.'s (generators, then discriminators) or that of the CycleGAN-Keras
code the paper adopted (discriminators on real, then on fake images, then generators).

Training checkpoints every epoch (atomically) and resumes from the checkpoint bit-exactly on
a CPU, so a worker that is stopped or killed loses at most one epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models.cyclegan import CycleGANProfile, build_cyclegan_nets
from models.durable import write_atomic
from nnoculation.runtime import default_device, seeded_rng

logger = logging.getLogger(__name__)

# Per-epoch records: mean over the epoch's batches. G is the adversarial (LSGAN) term of both
# generators, cycle and identity are the weighted L1 terms (the generators minimise the sum of
# the three), D is the halved discriminator objective of both discriminators.
LOSS_G = "G"
LOSS_D = "D"
LOSS_CYCLE = "cycle"
LOSS_IDENTITY = "identity"
LOSS_NAMES = (LOSS_G, LOSS_D, LOSS_CYCLE, LOSS_IDENTITY)
EPOCH_LR = "lr"  # the learning rate used during the epoch, recorded beside the losses

CHECKPOINT_FILE = "cyclegan.pt"
CHECKPOINT_FORMAT = 1

ADAM_BETA2 = 0.999  # Zhu et al.
D_LOSS_SCALE = 0.5  # appendix A.3: the discriminator objective is halved
POOL_SWAP_PROB = 0.5  # image history buffer: chance of answering with a stored image
POOL_SEED_OFFSET = 1  # the pools draw from their own stream, seeded with seed + 1
PIXEL_HALF_RANGE = 127.5  # uint8 [0, 255] <-> [-1, 1]
PIXEL_MAX = 255
TRANSLATE_BATCH = 256

EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after each epoch's checkpoint with the number of epochs done and that epoch's record."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for other data, another profile or another seed."""


@dataclass
class CycleGANResult:
    """What :func:`train_cyclegan` hands back; ``generator`` is ``G_AB`` (clean -> poisoned)."""

    generator: nn.Module
    losses: list[dict[str, float]]
    seconds: float
    epochs_done: int
    resumed_from_epoch: int | None
    stopped_early: bool
    profile: CycleGANProfile


class ImagePool:
    """The image history buffer of Zhu et al. (after Shrivastava et al.).

    Until ``size`` images are stored every fake is stored and returned; afterwards each fake is,
    with probability 1/2, swapped for a random stored one (which is returned instead). Draws
    come from ``generator`` so a run is reproducible and resumable.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.buffer: torch.Tensor | None = None
        self.count = 0

    def query(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach()
        if self.size == 0:
            return images
        if self.buffer is None:
            self.buffer = images.new_empty((self.size, *images.shape[1:]))
        out = []
        for image in images:
            if self.count < self.size:
                self.buffer[self.count] = image
                self.count += 1
                out.append(image)
            elif float(torch.rand((), generator=self.generator)) < POOL_SWAP_PROB:
                slot = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.buffer[slot].clone())
                self.buffer[slot] = image
            else:
                out.append(image)
        return torch.stack(out)

    def state(self) -> torch.Tensor:
        """The stored images (CPU), for a checkpoint."""
        if self.buffer is None:
            return torch.empty(0)
        return self.buffer[: self.count].cpu()

    def load(self, images: torch.Tensor, device: torch.device) -> None:
        if images.numel() == 0:
            self.buffer, self.count = None, 0
            return
        self.buffer = images.new_empty((self.size, *images.shape[1:]), device=device)
        self.count = int(images.shape[0])
        self.buffer[: self.count] = images.to(device)


def lr_factor(epoch: int, epochs: int, decay_epochs: int) -> float:
    """Learning-rate multiplier for 0-based ``epoch`` (Zhu et al.'s linear rule, sec. 4.2.2).

    1 for the first ``epochs - decay_epochs`` epochs, then linear decay reaching exactly 0 at
    ``epoch == epochs`` (the paper: constant for 100 epochs, decay to zero over the last 100).
    """
    constant = epochs - decay_epochs
    return 1.0 - max(0, epoch + 1 - constant) / (decay_epochs + 1)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, decay_epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch ``LambdaLR`` following :func:`lr_factor`."""

    def factor(epoch: int) -> float:
        return lr_factor(epoch, epochs, decay_epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fingerprint(
    domain_a: torch.Tensor, domain_b: torch.Tensor, profile: CycleGANProfile, seed: int
) -> str:
    """sha256 of both domains' pixels and shapes, the profile and the seed: a checkpoint is only
    resumed by the run it belongs to."""
    digest = hashlib.sha256()
    for images in (domain_a, domain_b):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(profile.to_dict(), sort_keys=True).encode())
    digest.update(str(seed).encode())
    return digest.hexdigest()


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / PIXEL_HALF_RANGE - 1.0


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1.0) * PIXEL_HALF_RANGE).round().clamp(0, PIXEL_MAX).to(torch.uint8)


def _check_images(name: str, images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"{name} must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}"
        )


def _check_domains(domain_a: torch.Tensor, domain_b: torch.Tensor) -> None:
    _check_images("domain_a", domain_a)
    _check_images("domain_b", domain_b)
    if len(domain_a) == 0 or len(domain_b) == 0:
        raise ValueError("both CycleGAN domains need at least one image")
    if domain_a.shape[1:] != domain_b.shape[1:]:
        raise ValueError(
            f"domains differ in image shape: {list(domain_a.shape[1:])} vs "
            f"{list(domain_b.shape[1:])}"
        )


def _with_epochs(profile: CycleGANProfile, epochs: int | None) -> CycleGANProfile:
    """``profile`` run for ``epochs`` epochs, keeping its share of decaying epochs (rounded)."""
    if epochs is None or epochs == profile.epochs:
        return profile
    if epochs < 1:
        raise ValueError(f"epochs must be positive, got {epochs}")
    decay = round(profile.decay_epochs * epochs / profile.epochs)
    return replace(profile, epochs=epochs, decay_epochs=min(decay, epochs))


def _epoch_order(size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``length`` indices into a domain of ``size``: fresh permutations, repeated as needed."""
    reps = math.ceil(length / size)
    return torch.cat([torch.randperm(size, generator=generator) for _ in range(reps)])[:length]


def _lsgan(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """LSGAN loss: mean squared distance of every patch score to 1 (real) or 0 (fake)."""
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def _step_record(
    adversarial: torch.Tensor, loss_d: torch.Tensor, cycle: torch.Tensor, identity: torch.Tensor
) -> dict[str, float]:
    return {
        LOSS_G: float(adversarial.detach()),
        LOSS_D: float(loss_d.detach()),
        LOSS_CYCLE: float(cycle.detach()),
        LOSS_IDENTITY: float(identity.detach()),
    }


def _set_requires_grad(nets: Iterable[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class _CycleGAN:
    """The four nets, their optimizers, schedulers and pools: one training step at a time.

    The nets' initial weights come from torch's global RNG: build it inside
    :func:`nnoculation.runtime.seeded_rng` (as :func:`train_cyclegan` does), which seeds that
    RNG for the run and gives the caller's state back afterwards.
    """

    def __init__(
        self, profile: CycleGANProfile, channels: int, seed: int, device: torch.device
    ) -> None:
        self.profile = profile
        self.device = device
        self.nets = {
            k: v.to(device).train() for k, v in build_cyclegan_nets(profile, channels).items()
        }
        betas = (profile.beta1, ADAM_BETA2)
        self.opt_g = torch.optim.Adam(
            chain(self.nets["G_AB"].parameters(), self.nets["G_BA"].parameters()),
            lr=profile.lr,
            betas=betas,
        )
        self.opt_d = torch.optim.Adam(
            chain(self.nets["D_A"].parameters(), self.nets["D_B"].parameters()),
            lr=profile.lr,
            betas=betas,
        )
        self.sched_g = make_lr_scheduler(self.opt_g, profile.epochs, profile.decay_epochs)
        self.sched_d = make_lr_scheduler(self.opt_d, profile.epochs, profile.decay_epochs)
        self.shuffle_gen = torch.Generator().manual_seed(seed)
        self.pool_gen = torch.Generator().manual_seed(seed + POOL_SEED_OFFSET)
        self.pool_a = ImagePool(profile.pool_size, self.pool_gen)  # fakes G_BA(B) for D_A
        self.pool_b = ImagePool(profile.pool_size, self.pool_gen)  # fakes G_AB(A) for D_B

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        if self.profile.step_order == "keras":
            return self._step_keras(real_a, real_b)
        d_a, d_b = self.nets["D_A"], self.nets["D_B"]
        _set_requires_grad((d_a, d_b), False)
        fake_b = self.nets["G_AB"](real_a)
        fake_a = self.nets["G_BA"](real_b)
        adversarial, cycle, identity = self._generator_losses(real_a, real_b, fake_a, fake_b)
        self._update(self.opt_g, adversarial + cycle + identity)

        _set_requires_grad((d_a, d_b), True)
        past_b = self.pool_b.query(fake_b.detach())
        past_a = self.pool_a.query(fake_a.detach())
        loss_d = D_LOSS_SCALE * (
            _lsgan(d_b(real_b), True)
            + _lsgan(d_b(past_b), False)
            + _lsgan(d_a(real_a), True)
            + _lsgan(d_a(past_a), False)
        )
        self._update(self.opt_d, loss_d)
        return _step_record(adversarial, loss_d, cycle, identity)

    def _step_keras(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        """CycleGAN-Keras's ``run_training_iteration``: fakes from the generators before their
        update go through the pools; each discriminator takes one Adam step on real images and
        one on pooled fakes (each loss halved, its ``loss_weights_D``); then the generators take
        theirs against the updated discriminators (its ``G_model``)."""
        d_a, d_b = self.nets["D_A"], self.nets["D_B"]
        fake_b = self.nets["G_AB"](real_a)
        fake_a = self.nets["G_BA"](real_b)
        past_a = self.pool_a.query(fake_a.detach())
        past_b = self.pool_b.query(fake_b.detach())
        _set_requires_grad((d_a, d_b), True)
        loss_real = D_LOSS_SCALE * (_lsgan(d_a(real_a), True) + _lsgan(d_b(real_b), True))
        self._update(self.opt_d, loss_real)
        loss_fake = D_LOSS_SCALE * (_lsgan(d_a(past_a), False) + _lsgan(d_b(past_b), False))
        self._update(self.opt_d, loss_fake)

        _set_requires_grad((d_a, d_b), False)
        adversarial, cycle, identity = self._generator_losses(real_a, real_b, fake_a, fake_b)
        self._update(self.opt_g, adversarial + cycle + identity)
        return _step_record(adversarial, loss_real + loss_fake, cycle, identity)

    def _generator_losses(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        fake_a: torch.Tensor,
        fake_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generators' adversarial (LSGAN), weighted cycle and weighted identity terms."""
        p = self.profile
        g_ab, g_ba, d_a, d_b = (self.nets[k] for k in ("G_AB", "G_BA", "D_A", "D_B"))
        adversarial = _lsgan(d_b(fake_b), True) + _lsgan(d_a(fake_a), True)
        cycle = p.cycle_weight * (F.l1_loss(g_ba(fake_b), real_a) + F.l1_loss(g_ab(fake_a), real_b))
        identity_weight = p.identity_weight * p.cycle_weight
        if identity_weight > 0:
            identity = identity_weight * (
                F.l1_loss(g_ab(real_b), real_b) + F.l1_loss(g_ba(real_a), real_a)
            )
        else:
            identity = torch.zeros((), device=self.device)
        return adversarial, cycle, identity

    @staticmethod
    def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def state(self) -> dict[str, Any]:
        # The global RNG states are those of the run's seeded scope (seeded_rng), not the
        # caller's: saving and restoring them keeps a resumed run bit-exact.
        rng: dict[str, torch.Tensor] = {
            "torch": torch.get_rng_state(),
            "shuffle": self.shuffle_gen.get_state(),
            "pool": self.pool_gen.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "nets": {
                k: {n: t.cpu() for n, t in v.state_dict().items()} for k, v in self.nets.items()
            },
            "optimizers": {"G": self.opt_g.state_dict(), "D": self.opt_d.state_dict()},
            "schedulers": {"G": self.sched_g.state_dict(), "D": self.sched_d.state_dict()},
            "pools": {"A": self.pool_a.state(), "B": self.pool_b.state()},
            "rng": rng,
        }

    def load(self, state: dict[str, Any]) -> None:
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
        self.opt_g.load_state_dict(state["optimizers"]["G"])
        self.opt_d.load_state_dict(state["optimizers"]["D"])
        self.sched_g.load_state_dict(state["schedulers"]["G"])
        self.sched_d.load_state_dict(state["schedulers"]["D"])
        self.pool_a.load(state["pools"]["A"], self.device)
        self.pool_b.load(state["pools"]["B"], self.device)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.shuffle_gen.set_state(rng["shuffle"])
        self.pool_gen.set_state(rng["pool"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` to ``path`` via a temp file in the same directory, fsync and rename, so an
    interrupted write never replaces the last complete checkpoint."""
    write_atomic(path, lambda handle: torch.save(obj, handle))


def _load_checkpoint(path: Path, expected_fingerprint: str) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{path} has checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}"
        )
    if state.get("fingerprint") != expected_fingerprint:
        raise CheckpointMismatchError(
            f"{path} was made for different data, profile or seed than this run "
            f"(profile {state.get('profile', {}).get('name')!r}, seed {state.get('seed')}); "
            "remove it or use another checkpoint_dir"
        )
    return state


def _mean_record(sums: dict[str, float], batches: int, lr: float) -> dict[str, float]:
    record = {name: sums[name] / max(batches, 1) for name in LOSS_NAMES}
    record[EPOCH_LR] = lr
    return record


def train_cyclegan(
    domain_a: torch.Tensor,
    domain_b: torch.Tensor,
    profile: CycleGANProfile,
    *,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    time_budget_s: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    epochs: int | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> CycleGANResult:
    """Train a CycleGAN from ``domain_a`` (clean validation) to ``domain_b`` (quarantine).

    Both domains are uint8 ``[N, C, H, W]`` of one image shape. One epoch is
    ``max(len(A), len(B))`` images in batches of ``profile.batch_size``, each domain shuffled
    on its own (the smaller one repeats). ``epochs`` overrides the profile's length, keeping its
    share of decaying epochs. With ``checkpoint_dir`` every epoch ends with an atomic
    checkpoint, and a run started on an existing checkpoint resumes it (same data, profile and
    seed only); on a CPU the resumed run ends with exactly the weights of an uninterrupted one.
    With ``time_budget_s`` training stops after the epoch in which the budget ran out.
    ``on_epoch_end(epochs_done, record)`` runs after each epoch's checkpoint; an exception it
    raises (e.g. a cancelled repair) stops training with that checkpoint in place. Torch's
    global RNG is seeded with ``seed`` for the run only: the caller's RNG state is the same
    before and after.
    """
    _check_domains(domain_a, domain_b)
    profile = _with_epochs(profile, epochs)
    dev = torch.device(device) if device is not None else default_device()
    with seeded_rng(seed, dev):
        return _train(
            domain_a, domain_b, profile, seed, checkpoint_dir, time_budget_s, dev, progress,
            on_epoch_end,
        )  # fmt: skip


def _train(
    domain_a: torch.Tensor,
    domain_b: torch.Tensor,
    profile: CycleGANProfile,
    seed: int,
    checkpoint_dir: Path | None,
    time_budget_s: float | None,
    dev: torch.device,
    progress: bool,
    on_epoch_end: EpochCallback | None,
) -> CycleGANResult:
    start = time.perf_counter()
    gan = _CycleGAN(profile, int(domain_a.shape[1]), seed, dev)
    expected = fingerprint(domain_a, domain_b, profile, seed)

    losses: list[dict[str, float]] = []
    first_epoch, resumed_from = 0, None
    path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = checkpoint_dir / CHECKPOINT_FILE
        if path.exists():
            state = _load_checkpoint(path, expected)
            gan.load(state)
            losses = [dict(r) for r in state["losses"]]
            first_epoch = resumed_from = int(state["epoch"])
            logger.info(
                "resuming CycleGAN %r from %s at epoch %d of %d",
                profile.name,
                path,
                first_epoch,
                profile.epochs,
            )

    real_a, real_b = domain_a.to(dev), domain_b.to(dev)
    length = max(len(real_a), len(real_b))
    batch = profile.batch_size
    stopped_early = False
    for epoch in range(first_epoch, profile.epochs):
        order_a = _epoch_order(len(real_a), length, gan.shuffle_gen)
        order_b = _epoch_order(len(real_b), length, gan.shuffle_gen)
        lr = gan.opt_g.param_groups[0]["lr"]
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        batches = 0
        bar = tqdm(
            total=math.ceil(length / batch),
            desc=f"cyclegan {epoch + 1}/{profile.epochs}",
            disable=None if progress else True,
            leave=False,
            unit="batch",
        )
        try:
            for i in range(0, length, batch):
                idx_a = order_a[i : i + batch].to(dev)
                idx_b = order_b[i : i + batch].to(dev)
                step = gan.step(_to_unit(real_a[idx_a]), _to_unit(real_b[idx_b]))
                for name in LOSS_NAMES:
                    sums[name] += step[name]
                batches += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in step.items()})
        finally:
            bar.close()
        gan.sched_g.step()
        gan.sched_d.step()
        record = _mean_record(sums, batches, lr)
        losses.append(record)
        if path is not None:
            _atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "fingerprint": expected,
                    "profile": profile.to_dict(),
                    "seed": seed,
                    "epoch": epoch + 1,
                    "losses": losses,
                    **gan.state(),
                },
                path,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        out_of_time = time_budget_s is not None and time.perf_counter() - start >= time_budget_s
        if out_of_time and epoch + 1 < profile.epochs:
            stopped_early = True
            break

    generator = gan.nets["G_AB"].cpu().eval()
    return CycleGANResult(
        generator=generator,
        losses=losses,
        seconds=time.perf_counter() - start,
        epochs_done=len(losses),
        resumed_from_epoch=resumed_from,
        stopped_early=stopped_early,
        profile=profile,
    )


def translate(
    generator: nn.Module, images: torch.Tensor, batch_size: int = TRANSLATE_BATCH
) -> torch.Tensor:
    """``generator(images)`` as uint8 ``[N, C, H, W]`` (rounded, clamped): the treatment images
    ``G(validation)`` of sec. 3.3. Runs without gradients in eval mode on the generator's device."""
    _check_images("images", images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = _to_unit(images[i : i + batch_size].to(device))
                out.append(_to_uint8(generator(x)).cpu())
    finally:
        generator.train(was_training)
    return torch.cat(out) if out else images.clone()
