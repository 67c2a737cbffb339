"""The ``paper`` CycleGAN profile pinned to what the paper states and, where it is silent, to the
CycleGAN-Keras code it adopted (appendix A.3, ref. [33]: simontomaskarlsson/CycleGAN-Keras,
``model.py``, the same values in every commit of its history); plus the Keras-only options that
profile uses (Glorot init, 'same' discriminator padding, the Keras step order).

docs/paper-departures.md lists what still differs and why.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from models.cyclegan import (
    CycleGANProfile,
    PatchDiscriminator,
    SameConv2d,
    build_cyclegan_nets,
    get_profile,
    same_padding,
)
from nnoculation.repair.cyclegan import (
    ADAM_BETA2,
    D_LOSS_SCALE,
    LOSS_G,
    LOSS_IDENTITY,
    _CycleGAN,
    _lsgan,
    train_cyclegan,
)

SIDE = 12


def domains(n: int = 8, side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images (A) and the same kind of images with a bright corner patch (B)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 120, (2 * n, 1, side, side), generator=g, dtype=torch.uint8)
    poisoned = clean[n:].clone()
    poisoned[:, :, -3:, -3:] = 255
    return clean[:n], poisoned


def tiny(step_order: str = "keras", **changes: object) -> CycleGANProfile:
    """The paper profile's recipe at a size that trains in a fraction of a second."""
    base = dict(ngf=4, ndf=4, n_blocks=1, disc_layers=1, batch_size=4, epochs=2, decay_epochs=1)
    return CycleGANProfile.from_dict(
        {**get_profile("paper").to_dict(), **base, "name": "tiny", "step_order": step_order}
        | changes
    )


def test_paper_profile_is_pinned() -> None:
    p = get_profile("paper")
    # Identity learning is off: CycleGAN-Keras model.py, use_identity_learning = False.
    assert p.identity_weight == 0.0
    # lambda_1 = lambda_2 = 10.0 (cycle weights A->B->A, B->A->B); lambda_D = 1.0 is our
    # unweighted adversarial term.
    assert p.cycle_weight == 10.0
    # lr_D = lr_G = 2e-4 (CycleGAN.__init__ defaults), beta_1 = 0.5, beta_2 = 0.999.
    assert p.lr == 2e-4 and p.beta1 == 0.5 and ADAM_BETA2 == 0.999
    # batch_size = 1, synthetic_pool_size = 50, epochs = 200.
    assert (p.batch_size, p.pool_size, p.epochs) == (1, 50, 200)
    # Linear decay: A.3 "constant at 0.0002 for first 100 epochs and then linearly decay to zero
    # for the last 100" (CycleGAN-Keras: decay_epoch = 101 but use_linear_decay = False; the
    # paper's statement wins, docs/paper-departures.md).
    assert p.decay_epochs == 100
    # loss_weights_D = [0.5]: the discriminator objective is halved (also A.3).
    assert D_LOSS_SCALE == 0.5
    # Table 18 (ngf 64, where CycleGAN-Keras modelGenerator has 32: the paper's table wins),
    # 9 residual blocks (modelGenerator: range(4, 13)); Table 17 and modelDiscriminator:
    # c64, c128, c256 at stride 2, c512 at stride 1.
    assert (p.ngf, p.ndf, p.n_blocks, p.disc_layers) == (64, 64, 9, 3)
    # Conv2D's default initialisers (glorot_uniform kernels, zero biases): ck, dk, Rk, uk.
    assert p.init == "glorot"
    # ck(): Conv2D(kernel_size=4, padding='same'); Table 17 "padding is 'Same'".
    assert p.disc_padding == "same"
    # train() -> run_training_iteration: D_A/D_B on real, then on synthetic, then G_model.
    assert p.step_order == "keras"


def test_profiles_made_before_the_keras_options_keep_zhus_behaviour() -> None:
    old = {k: v for k, v in get_profile("cpu").to_dict().items()}
    for key in ("init", "disc_padding", "step_order"):
        del old[key]
    profile = CycleGANProfile.from_dict(old)
    assert (profile.init, profile.disc_padding, profile.step_order) == ("normal", "zhu", "zhu")
    assert get_profile("cpu").step_order == "zhu"


@pytest.mark.parametrize("field", ["init", "disc_padding", "step_order"])
def test_unknown_option_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny(**{field: "tensorflow"})


def test_same_padding_is_tensorflows() -> None:
    # TF 'same': out = ceil(n / s), total = (out - 1) * s + k - n, the odd pixel after.
    assert same_padding(28, 4, 2) == (1, 1)  # ck stride 2 on an even side
    assert same_padding(7, 4, 2) == (1, 2)  # odd side
    assert same_padding(4, 4, 1) == (1, 2)  # the stride-1 layers (c512, output)
    assert same_padding(256, 3, 2) == (0, 1)  # dk in the generator
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 4, 1)
    x = torch.randn(1, 2, 5, 6)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 2, 1, 2)), conv.weight, conv.bias
    )
    assert torch.equal(conv(x), expected)


@pytest.mark.parametrize(
    ("side", "zhu", "same"), [(28, 1, 4), (256, 30, 32)]
)  # 256 / 8 = 32 patch scores a side in CycleGAN-Keras
def test_disc_padding_sets_the_patch_map(side: int, zhu: int, same: int) -> None:
    x = torch.zeros(1, 1, side, side)
    with torch.no_grad():
        assert PatchDiscriminator(1, 2, 3, "zhu")(x).shape[2:] == (zhu, zhu)
        assert PatchDiscriminator(1, 2, 3, "same")(x).shape[2:] == (same, same)
    # Padding has no parameters: a 'same' D has a plain D's state dict.
    zhu_keys = PatchDiscriminator(1, 2, 3, "zhu").state_dict().keys()
    assert PatchDiscriminator(1, 2, 3, "same").state_dict().keys() == zhu_keys


def test_glorot_init() -> None:
    torch.manual_seed(0)
    nets = build_cyclegan_nets(tiny(ngf=16, ndf=16, n_blocks=2, disc_layers=2), 3)
    convs = [
        m
        for net in nets.values()
        for m in net.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    for conv in convs:
        # torch's fans (Keras's for the same kernel): dim 1 x kernel is fan_in, dim 0 fan_out.
        receptive = conv.weight[0, 0].numel()
        fan_in, fan_out = conv.weight.shape[1] * receptive, conv.weight.shape[0] * receptive
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        if conv.weight.numel() >= 1000:  # the std of U(-b, b) is b / sqrt(3), not 0.02
            assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert conv.bias is not None and not conv.bias.any()
    normal = build_cyclegan_nets(tiny(init="normal", ngf=16, n_blocks=2), 3)["G_AB"]
    widest = max(
        (m for m in normal.modules() if isinstance(m, torch.nn.Conv2d)),
        key=lambda m: m.weight.numel(),
    )
    assert widest.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("order", ["zhu", "keras"])
def test_step_order(order: str) -> None:
    """Keras order: two D steps (real, fake) before the G step, whose adversarial term is
    scored by the *updated* discriminators; Zhu's: one D step after G, scored by the old ones."""
    a, b = domains()
    real_a, real_b = a[:4].float() / 127.5 - 1, b[:4].float() / 127.5 - 1
    torch.manual_seed(0)
    gan = _CycleGAN(tiny(order, pool_size=0), 1, 0, torch.device("cpu"))
    before = copy.deepcopy(gan.nets)
    record = gan.step(real_a, real_b)

    d_steps = {int(s["step"]) for s in gan.opt_d.state.values()}
    g_steps = {int(s["step"]) for s in gan.opt_g.state.values()}
    assert (d_steps, g_steps) == ({2 if order == "keras" else 1}, {1})

    judges = gan.nets if order == "keras" else before
    with torch.no_grad():
        fake_b, fake_a = before["G_AB"](real_a), before["G_BA"](real_b)
        expected = _lsgan(judges["D_B"](fake_b), True) + _lsgan(judges["D_A"](fake_a), True)
    assert record[LOSS_G] == pytest.approx(float(expected), rel=1e-5)
    assert record[LOSS_IDENTITY] == 0.0


def test_keras_order_resumes_bit_exactly(tmp_path: Path) -> None:
    a, b = domains(n=8)
    profile = tiny(pool_size=3, epochs=3)
    full = train_cyclegan(a, b[:5], profile, seed=1, progress=False, device="cpu")

    def interrupt(epochs_done: int, record: dict[str, float]) -> None:
        if epochs_done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cyclegan(
            a, b[:5], profile, seed=1, checkpoint_dir=tmp_path, progress=False,
            on_epoch_end=interrupt, device="cpu",
        )  # fmt: skip
    resumed = train_cyclegan(
        a, b[:5], profile, seed=1, checkpoint_dir=tmp_path, progress=False, device="cpu"
    )
    assert resumed.resumed_from_epoch == 1 and resumed.losses == full.losses
    got, want = resumed.generator.state_dict(), full.generator.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(math.isfinite(v) for r in full.losses for v in r.values())
