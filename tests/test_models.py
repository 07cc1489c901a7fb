"""models: the registry, losses (SSIM parity with skimage), UNeXt2, the print helper."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.metrics import structural_similarity

from vsbench import io
from vsbench.models import (
    ARCHS,
    REGISTRY,
    IdentityModel,
    UNet3D,
    build_model,
    describe,
    model_config,
    register,
)
from vsbench.models.__main__ import main as print_main
from vsbench.models.losses import LOSSES, l1_msssim_loss, loss_function, ms_ssim, n_scales, ssim
from vsbench.models.unext2 import UNeXt2
from vsbench.predict import load_model, predict_volume
from vsbench.train import checkpoint, model_settings, train_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

UNEXT2 = dict(
    arch="unext2",
    base_channels=4,
    depth=2,
    epochs=2,
    steps_per_epoch=3,
    val_steps=1,
    batch_size=2,
    crop=[4, 16, 16],
    lr=0.01,
    loss="l1_msssim",
)


def smooth_volume(seed: int, shape) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.normal(size=shape), 1.0)


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_arch_and_keeps_the_old_behaviour():
    assert {"identity", "unet3d", "unext2"} <= set(ARCHS) and set(ARCHS) == set(REGISTRY)
    assert model_config({"arch": "identity"}) == {}
    assert isinstance(build_model("identity", {}), IdentityModel)
    s = model_settings({"arch": "unet3d", "base_channels": 6, "depth": 3, "crop": [8, 32, 32]})
    assert model_config(s) == {
        "in_channels": 1,
        "out_channels": 1,
        "base_channels": 6,
        "depth": 3,
        "z_levels": 2,
        "inplane_levels": 1,
    }
    assert isinstance(build_model("unet3d", model_config(s)), UNet3D)
    with pytest.raises(io.InputError, match="unknown model arch 'vit'"):
        build_model("vit", {})
    with pytest.raises(io.InputError, match="unknown model arch"):
        model_config({"arch": "vit"})
    with pytest.raises(io.InputError, match="identity model takes no configuration"):
        build_model("identity", {"depth": 2})
    with pytest.raises(io.InputError, match="bad unext2 model_config"):
        build_model("unext2", {"no_such_argument": 1})


def test_adding_an_architecture_is_one_registration():
    @register("test_scale", config=lambda s: {"factor": float(s["factor"])})
    class Scale(torch.nn.Module):
        divisibility = (1, 1, 1)

        def __init__(self, factor: float):
            super().__init__()
            self.factor = torch.nn.Parameter(torch.tensor(factor))

        def forward(self, x):
            return x * self.factor

    try:
        model = build_model("test_scale", model_config({"arch": "test_scale", "factor": 3}))
        assert float(model(torch.ones(1)).detach()) == 3.0
        with pytest.raises(ValueError, match="registered twice"):
            register("test_scale", config=dict)(Scale)
    finally:
        REGISTRY.pop("test_scale")


# --------------------------------------------------------------------------- losses


def test_ssim_matches_skimage_on_a_3d_volume():
    a = smooth_volume(0, (16, 32, 32))
    b = a + 0.3 * np.random.default_rng(1).normal(size=a.shape)
    dr = float(b.max() - b.min())
    ref = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=dr
    )
    got64 = ssim(torch.from_numpy(a), torch.from_numpy(b), data_range=dr)
    got32 = ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float(), data_range=dr)
    assert 0.2 < ref < 0.95  # a non-trivial value
    assert float(got64) == pytest.approx(ref, abs=1e-10)
    assert float(got32) == pytest.approx(ref, abs=1e-5)
    # data_range=None takes the target's range
    assert float(ssim(torch.from_numpy(a), torch.from_numpy(b))) == pytest.approx(ref, abs=1e-10)


def test_ms_ssim_is_one_for_identical_inputs_and_loss_is_zero():
    x = torch.randn(3, 1, 8, 64, 64)
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(3))
    assert float(l1_msssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    noisy = ms_ssim(x, x + 0.5 * torch.randn_like(x))
    assert (noisy < 0.99).all() and (noisy > 0).all()
    assert n_scales((64, 64)) == 3 and n_scales((16, 16)) == 1 and n_scales((512, 512)) == 5


def test_mixed_loss_gradients_are_finite_even_for_anticorrelated_inputs():
    tgt = torch.randn(2, 1, 4, 24, 24)
    for pred in (-tgt.clone(), torch.zeros_like(tgt), torch.randn_like(tgt)):
        pred.requires_grad_(True)
        loss = l1_msssim_loss(pred, tgt)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # the (1, Z, Y, X) sample shape used by the identity baseline works too
    assert torch.isfinite(l1_msssim_loss(tgt[0], -tgt[0]))


def test_loss_selection_by_name():
    a, b = torch.randn(2, 1, 4, 8, 8), torch.randn(2, 1, 4, 8, 8)
    assert set(LOSSES) == {"mse", "l1", "l1_msssim"}
    assert loss_function("mse")(a, b) == torch.nn.functional.mse_loss(a, b)
    assert loss_function("l1")(a, b) == torch.nn.functional.l1_loss(a, b)
    assert loss_function("l1_msssim") is l1_msssim_loss
    with pytest.raises(ValueError, match="huber"):
        loss_function("huber")
    assert model_settings({"arch": "unet3d", "loss": "l1_msssim"})["loss"] == "l1_msssim"
    with pytest.raises(io.InputError, match="loss"):
        model_settings({"arch": "unet3d", "loss": "huber"})


# --------------------------------------------------------------------------- unext2


@pytest.mark.parametrize("shape", [(1, 1, 8, 64, 64), (2, 1, 8, 37, 29), (1, 1, 3, 16, 20)])
def test_unext2_output_shape_for_several_sizes(shape):
    torch.manual_seed(0)
    model = UNeXt2(in_stack_depth=8, base_channels=4, depth=3).eval()
    assert model.divisibility == (1, 8, 8) and model.z_window == 8
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == shape and torch.isfinite(out).all()


def test_unext2_deeper_stacks_use_blended_z_windows():
    torch.manual_seed(0)
    model = UNeXt2(in_stack_depth=4, base_channels=4, depth=2).eval()
    x = torch.randn(1, 1, 10, 16, 16)
    with torch.no_grad():
        out = model(x)
        first = model(x[:, :, :4])
        last = model(x[:, :, 6:])
    # windows start at 0, 2, 4, 6: slice 0 is seen only by the first window, slice 9 by the last
    torch.testing.assert_close(out[:, :, 0], first[:, :, 0])
    torch.testing.assert_close(out[:, :, 9], last[:, :, 3])


def test_unext2_trains_and_its_checkpoint_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(3):
        x = smooth_volume(i, (1, 6, 24, 24)).astype(np.float32)
        pairs.append((x, np.tanh(2 * x) + 0.1 * rng.normal(size=x.shape).astype(np.float32)))
    s = model_settings(UNEXT2)
    final = train_model(pairs[:2], pairs[2:], s, seed=0)
    losses = [h["train_loss"] for h in final["history"]] + [h["val_loss"] for h in final["history"]]
    assert len(final["history"]) == 2 and np.isfinite(losses).all()
    assert final["model_config"]["in_stack_depth"] == 4
    path = tmp_path / "model.ckpt"
    torch.save(
        checkpoint(final["settings"], final["state_dict"], final["epoch"], final["val_loss"]), path
    )
    model, meta = load_model(path, "cpu")  # strict: raises on any missing/unexpected key
    assert meta["arch"] == "unext2" and isinstance(model, UNeXt2)
    ref = build_model("unext2", final["model_config"])
    result = ref.load_state_dict(final["state_dict"], strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.from_numpy(pairs[2][0][None])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x))


def test_unext2_learns_a_nonlinear_target_and_beats_identity():
    def pair(seed):  # target = smoothed (|input| > 1): nonlinear, uncorrelated with the input
        rng = np.random.default_rng(seed)
        x = ndi.gaussian_filter(rng.normal(size=(2, 8, 40, 40)), (0, 0.7, 1.5, 1.5))
        x = ((x - x.mean()) / x.std()).astype(np.float32)
        y = ndi.gaussian_filter((np.abs(x) > 1.0).astype(np.float32), (0, 0.7, 1.0, 1.0))
        return x, ((y - y.mean()) / y.std()).astype(np.float32)

    train, val = [pair(i) for i in range(3)], [pair(10)]
    s = model_settings(
        {**UNEXT2, "base_channels": 8, "epochs": 4, "steps_per_epoch": 12, "batch_size": 4}
    )
    s = {**s, "crop": [4, 24, 24], "loss": "mse"}
    final = train_model(train, val, s, seed=0)
    model = build_model("unext2", final["model_config"])
    model.load_state_dict(final["best"]["state_dict"])
    x, y = val[0]
    pred = predict_volume(model, x[0], tile_yx=24, overlap=0.25)  # Z 8 > window 4: blended
    assert abs(np.corrcoef(x[0].ravel(), y[0].ravel())[0, 1]) < 0.3
    assert np.corrcoef(pred.ravel(), y[0].ravel())[0, 1] > 0.6


# --------------------------------------------------------------------------- print helper


def test_describe_and_print_table(capsys):
    d = describe("unext2", {"base_channels": 8, "depth": 2, "crop": [8, 64, 64]})
    assert d["input"] == d["output"] == (1, 1, 8, 64, 64) and d["params"] > 1000
    assert describe("identity", {"crop": [4, 8, 8]})["params"] == 0
    print_main(["--print", "--crop", "4", "32", "32"])
    out = capsys.readouterr().out
    for arch in ARCHS:
        assert f"| {arch} |" in out
    assert "1×1×4×32×32" in out


# --------------------------------------------------------------------------- pix2pix3d


def test_pix2pix3d_discriminator_shapes_and_lsgan_objective():
    from vsbench.models.pix2pix3d import (
        D_LR_FRACTION,
        Pix2Pix3D,
        discriminator_loss,
        generator_loss,
        lsgan_loss,
    )

    torch.manual_seed(0)
    gan = Pix2Pix3D("unet3d", {"base_channels": 4, "depth": 2, "z_levels": 1}, 4, 2, 2)
    src = torch.randn(2, 1, 4, 32, 32)
    tgt = torch.tanh(2 * src)
    logits = gan.discriminator(src, tgt)
    assert [tuple(p.shape) for p in logits] == [(2, 1, 4, 7, 7), (2, 1, 4, 3, 3)]
    assert float(lsgan_loss([torch.ones(3)], True)) == 0.0
    assert float(lsgan_loss([torch.zeros(3)], False)) == 0.0
    assert float(lsgan_loss([torch.zeros(3), torch.ones(3)], True)) == 0.5
    # a few TTUR alternating steps: D learns to tell the pair apart, everything stays finite
    lr = 2e-3
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(
        gan.discriminator.parameters(), lr=lr * D_LR_FRACTION, betas=(0.5, 0.999)
    )
    d_losses = []
    for _ in range(6):
        fake = gan(src)
        d_loss = discriminator_loss(
            gan.discriminator(src, tgt), gan.discriminator(src, fake.detach())
        )
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = generator_loss(gan.discriminator(src, fake), fake, tgt)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        d_losses.append(float(d_loss.detach()))
        assert torch.isfinite(g_loss)
    assert d_losses[-1] < d_losses[0]


PIX2PIX = dict(
    arch="pix2pix3d",
    generator="unet3d",
    base_channels=4,
    depth=2,
    disc_base_channels=4,
    epochs=3,
    steps_per_epoch=6,
    val_steps=2,
    batch_size=2,
    crop=[4, 24, 24],
    lr=0.005,
    loss="l1",
)


def gan_pairs():
    def pair(seed):
        x = smooth_volume(seed, (2, 8, 40, 40)).astype(np.float32)
        x = (x - x.mean()) / x.std()
        return x, np.tanh(2 * x).astype(np.float32)

    return [pair(0), pair(1)], [pair(5)]


def test_pix2pix3d_trains_with_manual_optimisation_and_resumes(tmp_path):
    """G and D alternate (TTUR), D/G losses are logged, val_loss is the same key as the
    others, and the resume state restores both optimisers exactly."""
    train, val = gan_pairs()
    s = model_settings(PIX2PIX)
    full = train_model(train, val, s, seed=3)
    hist = full["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert all(np.isfinite([h["d_loss"], h["g_loss"], h["val_loss"]]).all() for h in hist)
    assert 0.0 < hist[-1]["d_loss"] < 0.5  # D neither wins outright nor collapses
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert isinstance(full["optimizer"], list) and len(full["optimizer"]) == 2
    assert full["optimizer"][1]["param_groups"][0]["lr"] == pytest.approx(
        full["optimizer"][0]["param_groups"][0]["lr"] * 0.1
    )  # TTUR
    states = []

    def persist_then_die(state):
        states.append(state)
        if state["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train_model(train, val, s, seed=3, on_epoch_end=persist_then_die)
    resumed = train_model(train, val, s, seed=3, resume=states[-1])
    assert all(
        torch.equal(full["state_dict"][k], resumed["state_dict"][k]) for k in full["state_dict"]
    )
    # the checkpoint predicts with the generator alone
    path = tmp_path / "gan.ckpt"
    torch.save(checkpoint(s, full["state_dict"], 2, hist[-1]["val_loss"]), path)
    model, meta = load_model(path)
    assert meta["arch"] == "pix2pix3d"
    pred = predict_volume(model, val[0][0][0], tile_yx=24, overlap=0.25)
    assert pred.shape == val[0][0][0].shape and np.isfinite(pred).all()


class Killed(Exception):
    pass


def test_pix2pix3d_config_and_errors():
    cfg = model_config(model_settings({**PIX2PIX, "generator": "unext2"}))
    assert cfg["generator_arch"] == "unext2" and cfg["l1_weight"] == 100.0
    with pytest.raises(ValueError, match="generator"):
        model_config(model_settings({**PIX2PIX, "generator": "identity"}))
    with pytest.raises(io.InputError, match="accumulate"):
        model_settings({**PIX2PIX, "accumulate": 2})
