"""CycleGAN nets (Tables 17/18), profiles and the resumable training loop (sec. 4.2.2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from models.cyclegan import (
    CYCLEGAN_PROFILES,
    CycleGANProfile,
    PatchDiscriminator,
    ResidualBlock,
    ResnetGenerator,
    build_cyclegan_nets,
    disc_min_side,
    get_profile,
)
from nnoculation.repair.cyclegan import (
    CHECKPOINT_FILE,
    EPOCH_LR,
    LOSS_NAMES,
    CheckpointMismatchError,
    lr_factor,
    make_lr_scheduler,
    train_cyclegan,
    translate,
)

SIDE = 12
PAPER_SHAPES = [(1, 28, 28), (3, 32, 32), (3, 55, 47)]


def domains(n: int = 16, side: int = SIDE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images (A) and the same kind of images with a bright corner patch (B)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 120, (2 * n, 1, side, side), generator=g, dtype=torch.uint8)
    poisoned = clean[n:].clone()
    poisoned[:, :, -3:, -3:] = 255
    return clean[:n], poisoned


def generator_weights(result_generator: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result_generator.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_registry_and_profile_roundtrip() -> None:
    assert {"paper", "cpu", "cpu-fast", "test"} <= set(CYCLEGAN_PROFILES.names())
    for name in CYCLEGAN_PROFILES:
        profile = get_profile(name)
        assert profile.name == name
        assert CycleGANProfile.from_dict(profile.to_dict()) == profile
    paper = get_profile("paper")
    assert (paper.ngf, paper.ndf, paper.n_blocks, paper.disc_layers) == (64, 64, 9, 3)
    assert (paper.batch_size, paper.epochs, paper.decay_epochs, paper.lr) == (1, 200, 100, 2e-4)
    assert (paper.beta1, paper.cycle_weight, paper.pool_size) == (0.5, 10.0, 50)
    with pytest.raises(ValueError, match="decay_epochs"):
        CycleGANProfile("bad", 4, 4, 1, 1, 1, epochs=2, decay_epochs=3)


def test_paper_generator_structure() -> None:
    gen = ResnetGenerator(3, 64, 9)
    blocks = [m for m in gen.modules() if isinstance(m, ResidualBlock)]
    convs = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)]
    ups = [m for m in gen.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(blocks) == 9
    assert convs[0].out_channels == 64 and convs[0].kernel_size == (7, 7)  # c7s1-64
    assert [c.out_channels for c in convs[1:3]] == [128, 256]  # d128, d256
    assert [u.out_channels for u in ups] == [128, 64]  # u128, u64
    assert convs[-1].out_channels == 3 and isinstance(gen.model[-1], torch.nn.Tanh)


def test_paper_discriminator_structure() -> None:
    disc = PatchDiscriminator(3, 64, 3)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [  # Table 17
        (64, 2),
        (128, 2),
        (256, 2),
        (512, 1),
        (1, 1),
    ]
    assert disc_min_side(3) <= 28


@pytest.mark.parametrize("shape", PAPER_SHAPES)
def test_paper_nets_shapes(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    nets = build_cyclegan_nets(get_profile("paper"), shape[0])
    x = torch.rand(1, *shape) * 2 - 1
    with torch.no_grad():
        y = nets["G_AB"](x)
        score = nets["D_A"](x)
    assert y.shape == x.shape
    assert y.abs().max() <= 1
    assert score.ndim == 4 and score.shape[:2] == (1, 1) and min(score.shape[2:]) >= 1


def test_small_inputs_are_padded() -> None:
    gen, disc = ResnetGenerator(1, 4, 1), PatchDiscriminator(1, 4, 3)
    x = torch.rand(2, 1, 5, 7) * 2 - 1
    assert gen(x).shape == x.shape
    assert disc(x).shape[2:] == (1, 1)


def test_paper_profile_trains_one_epoch() -> None:
    a, b = domains(n=2, side=28)
    result = train_cyclegan(a, b, get_profile("paper"), epochs=1, progress=False, device="cpu")
    assert result.epochs_done == 1 and len(result.losses) == 1
    assert all(math.isfinite(result.losses[0][k]) for k in LOSS_NAMES)


def test_training_and_translate() -> None:
    a, b = domains()
    result = train_cyclegan(a, b, get_profile("test"), progress=False, device="cpu")
    assert result.epochs_done == 2 and not result.stopped_early
    assert result.resumed_from_epoch is None
    assert all(math.isfinite(r[k]) for r in result.losses for k in LOSS_NAMES)
    assert not result.generator.training
    result.generator.train(True)  # translate runs in eval mode and gives the mode back
    treated = translate(result.generator, a, batch_size=5)
    assert result.generator.training
    assert treated.dtype == torch.uint8 and treated.shape == a.shape
    # G's output mapped from [-1, 1] back to pixels, worked out here.
    result.generator.eval()
    with torch.no_grad():
        outputs = [result.generator(a[i : i + 5].float() / 127.5 - 1) for i in range(0, len(a), 5)]
    expected = ((torch.cat(outputs) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(treated, expected) and not torch.equal(treated, a)


def test_identity_weight_zero_records_zero() -> None:
    a, b = domains()
    profile = CycleGANProfile("no-idt", 4, 4, 1, 1, 8, 1, 0, identity_weight=0.0, pool_size=0)
    result = train_cyclegan(a, b, profile, progress=False, device="cpu")
    assert result.losses[0]["identity"] == 0.0


def test_seeding() -> None:
    a, b = domains()
    profile = get_profile("test")
    runs = [
        generator_weights(train_cyclegan(a, b, profile, seed=s, progress=False).generator)
        for s in (0, 0, 1)
    ]
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # Uneven domain sizes and a pool smaller than an epoch exercise cycling and pool swaps.
    a, b = domains(n=16)
    b = b[:11]
    profile = CycleGANProfile("resume", 4, 4, 1, 1, 4, epochs=3, decay_epochs=2, pool_size=5)
    full = train_cyclegan(a, b, profile, seed=3, progress=False, device="cpu")

    def interrupt(epochs_done: int, record: dict[str, float]) -> None:
        if epochs_done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cyclegan(
            a, b, profile, seed=3, checkpoint_dir=tmp_path, progress=False, on_epoch_end=interrupt
        )
    assert (tmp_path / CHECKPOINT_FILE).exists()
    assert not list(tmp_path.glob("*.tmp"))
    resumed = train_cyclegan(a, b, profile, seed=3, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_done == 3
    assert resumed.losses == full.losses
    assert same_weights(generator_weights(resumed.generator), generator_weights(full.generator))


def test_checkpoint_for_other_data_is_refused(tmp_path: Path) -> None:
    a, b = domains()
    profile = get_profile("test")
    train_cyclegan(a, b, profile, checkpoint_dir=tmp_path, epochs=1, progress=False)
    other_b = b.clone()
    other_b[0, 0, 0, 0] ^= 1
    with pytest.raises(CheckpointMismatchError, match="different data"):
        train_cyclegan(a, other_b, profile, checkpoint_dir=tmp_path, epochs=1, progress=False)


def test_lr_schedule_constant_then_linear_to_zero() -> None:
    epochs, decay = 6, 3
    factors = [lr_factor(e, epochs, decay) for e in range(epochs + 1)]
    assert factors[: epochs - decay] == [1.0] * (epochs - decay)
    steps = [factors[i] - factors[i + 1] for i in range(epochs - decay - 1, epochs)]
    assert all(s == pytest.approx(1 / (decay + 1)) for s in steps)
    assert factors[-1] == 0.0

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=2e-4)
    sched = make_lr_scheduler(opt, epochs, decay)
    seen = []
    for _ in range(epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-4 * f for f in factors[:epochs]])
    assert opt.param_groups[0]["lr"] == 0.0

    a, b = domains(n=4)
    profile = CycleGANProfile("lr", 4, 4, 1, 1, 4, epochs=epochs, decay_epochs=decay)
    result = train_cyclegan(a, b, profile, progress=False)
    assert [r[EPOCH_LR] for r in result.losses] == pytest.approx(seen)


def test_time_budget_stops_after_first_epoch() -> None:
    a, b = domains()
    result = train_cyclegan(a, b, get_profile("test"), time_budget_s=0.0, progress=False)
    assert result.stopped_early and result.epochs_done == 1


def test_a_stored_generator_reproduces_its_translation() -> None:
    from nnoculation.repair.reverse import fit_poison, load_poison

    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 255, (16, 1, 12, 12), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 255, (16, 1, 12, 12), generator=g, dtype=torch.uint8)
    poison = fit_poison("test", a, b, progress=False)
    again = load_poison(poison.report(), poison.state(), channels=1)
    assert torch.equal(again.apply(a), poison.apply(a))
