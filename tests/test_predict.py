"""predict: sliding-window blending, checkpoint loading and its errors, the step script."""

import runpy
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vsbench import io
from vsbench.models import IdentityModel, UNet3D, build_model, model_config
from vsbench.predict import load_model, predict_volume
from vsbench.preprocess import fov_statistics, normalize
from vsbench.train import checkpoint, model_settings

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEP = Path(__file__).resolve().parents[1] / "src" / "vsbench" / "steps" / "predict.py"
UNET = model_settings(
    {"arch": "unet3d", "base_channels": 4, "depth": 2, "crop": [8, 32, 32], "epochs": 1}
)


class Pointwise(torch.nn.Module):
    """A nonlinear function of each voxel alone (1×1×1 convs), with two output channels."""

    divisibility = (4, 1, 1)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(1, 3, 1), torch.nn.Tanh(), torch.nn.Conv3d(3, 2, 1)
        )

    def forward(self, x):
        return self.net(x)


def random_unet_checkpoint(path: Path, settings=UNET, **extra) -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_model("unet3d", model_config(settings))
    # non-trivial BN statistics so eval mode differs from a fresh model
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 32, 32))
    model.eval()
    torch.save(checkpoint(settings, model.state_dict(), 3, 0.25, **extra), path)
    return model


# --------------------------------------------------------------------------- tiling (vsbench.tiling)


def test_tiled_pointwise_prediction_equals_full_volume():
    model = Pointwise().eval()
    rng = np.random.default_rng(0)
    zyx = rng.normal(size=(6, 70, 90)).astype(np.float32)
    with torch.no_grad():
        full = model(torch.from_numpy(zyx)[None, None])[0].numpy()
    tiled = predict_volume(model, zyx, tile_yx=32, overlap=0.25, batch_size=3)
    assert tiled.shape == (2, 6, 70, 90)  # accumulator has the model's output channels
    np.testing.assert_allclose(tiled, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", ["tent", "gaussian"])
def test_z_windows_and_yx_tiles_of_a_pointwise_model_equal_the_full_volume(weights):
    model = Pointwise().eval()  # divisibility 4 in Z: 6-slice windows are padded to 8
    zyx = np.random.default_rng(1).normal(size=(13, 50, 45)).astype(np.float32)
    with torch.no_grad():
        full = model(torch.from_numpy(zyx)[None, None])[0].numpy()
    tiled = predict_volume(
        model, zyx, tile_yx=24, overlap=0.3, tile_z=6, z_overlap=0.5, weights=weights
    )
    assert tiled.shape == (2, 13, 50, 45)
    np.testing.assert_allclose(tiled, full, rtol=1e-5, atol=1e-6)


def test_z_window_defaults_to_the_model_and_windows_are_blended():
    class Depth(torch.nn.Module):
        """Outputs the window's own slice count: blending must average windows smoothly."""

        z_window = 4
        divisibility = (1, 1, 1)

        def forward(self, x):
            z = torch.arange(x.shape[2], dtype=x.dtype).reshape(1, 1, -1, 1, 1)
            return z.expand_as(x).clone()

    out = predict_volume(Depth(), np.zeros((10, 8, 8), np.float32), tile_yx=8)
    # windows start at 0, 2, 4, 6: every slice is a tent-weighted mean of in-window indices
    assert out.shape == (10, 8, 8) and 0.0 <= out.min() and out.max() <= 3.0
    assert out[0, 0, 0] == 0.0 and out[-1, 0, 0] == 3.0  # edges are covered by one window


def test_blending_has_no_seams():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.full_like(x, 3.0)

    out = predict_volume(Constant(), np.zeros((3, 50, 77), np.float32), tile_yx=16, overlap=0.5)
    assert out.shape == (3, 50, 77)
    np.testing.assert_allclose(out, 3.0, rtol=1e-6)
    # a linear ramp through a pointwise model stays a ramp: no steps at tile borders
    ramp = np.broadcast_to(np.linspace(-1, 1, 77, dtype=np.float32), (3, 50, 77)).copy()
    pred = predict_volume(IdentityModel(), ramp, tile_yx=16, overlap=0.3)
    np.testing.assert_allclose(pred, ramp, atol=1e-6)
    np.testing.assert_allclose(np.diff(pred, axis=2), np.diff(ramp, axis=2), atol=1e-6)


def test_unet_prediction_keeps_odd_shapes_and_uses_context():
    model = UNet3D(base_channels=4, depth=2, z_levels=2).eval()
    zyx = np.random.default_rng(1).normal(size=(6, 50, 70)).astype(np.float32)
    out = predict_volume(model, zyx, tile_yx=32, overlap=0.25, batch_size=2)
    assert out.shape == zyx.shape and np.isfinite(out).all()
    with torch.no_grad():
        full = model(torch.from_numpy(zyx)[None, None])[0, 0].numpy()
    # not pointwise, so tiles differ from the full pass near borders, but only slightly
    assert np.corrcoef(out.ravel(), full.ravel())[0, 1] > 0.95


# --------------------------------------------------------------------------- checkpoints


def test_load_model_roundtrip_is_weights_only(tmp_path):
    path = tmp_path / "model.ckpt"
    ref = random_unet_checkpoint(path, target="nucleus")
    model, meta = load_model(path, "cpu")
    assert not model.training and meta["arch"] == "unet3d" and meta["target"] == "nucleus"
    assert "state_dict" not in meta and meta["epoch"] == 3
    x = torch.randn(1, 1, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    torch.load(path, weights_only=True)  # plain tensors and primitives only


def test_identity_checkpoint_predicts_the_input(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint(model_settings({"arch": "identity"}), {}, 0, 1.0), path)
    model, meta = load_model(path)
    zyx = np.random.default_rng(2).normal(size=(5, 40, 33)).astype(np.float32)
    np.testing.assert_allclose(predict_volume(model, zyx, tile_yx=16), zyx, rtol=1e-6, atol=1e-7)


def test_load_model_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(io.InputError, match=f"{missing}.*not found"):
        load_model(missing)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(io.InputError, match=f"{garbage}.*not a readable"):
        load_model(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"format": "lightning", "state_dict": {}}, foreign)
    with pytest.raises(io.InputError, match=f"{foreign}.*vsbench-model/1"):
        load_model(foreign)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"format": "vsbench-model/1", "obj": object()}, pickled)
    with pytest.raises(io.InputError, match=f"{pickled}.*not a readable"):
        load_model(pickled)

    good = tmp_path / "good.ckpt"
    random_unet_checkpoint(good)
    ckpt = torch.load(good, weights_only=True)

    wrong_shape = tmp_path / "wrong_shape.ckpt"
    torch.save({**ckpt, "model_config": {**ckpt["model_config"], "base_channels": 6}}, wrong_shape)
    with pytest.raises(io.InputError, match=f"{wrong_shape}.*do not fit"):
        load_model(wrong_shape)
    sd = dict(ckpt["state_dict"])
    sd.pop("head.weight")
    missing_key = tmp_path / "missing_key.ckpt"
    torch.save({**ckpt, "state_dict": sd}, missing_key)
    with pytest.raises(io.InputError, match=f"{missing_key}.*missing.*head.weight"):
        load_model(missing_key)
    extra_key = tmp_path / "extra_key.ckpt"
    torch.save({**ckpt, "state_dict": {**ckpt["state_dict"], "x": torch.zeros(1)}}, extra_key)
    with pytest.raises(io.InputError, match=f"{extra_key}.*unexpected"):
        load_model(extra_key)
    unknown = tmp_path / "unknown.ckpt"
    torch.save({**ckpt, "arch": "vit"}, unknown)
    with pytest.raises(io.InputError, match=f"{unknown}.*unknown model arch"):
        load_model(unknown)
    as_identity = tmp_path / "as_identity.ckpt"
    torch.save({**ckpt, "arch": "identity", "model_config": {}}, as_identity)
    with pytest.raises(io.InputError, match=f"{as_identity}.*unexpected"):
        load_model(as_identity)


REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def test_stored_reference_output():
    """A shipped tiny checkpoint (tests/data/reference, made by make_reference.py) predicts
    its stored output: zero missing/unexpected keys, Pearson > 0.999 and |diff| <= 1e-4 of
    the output's range (tolerance for BLAS/torch-version rounding); CPU reruns are bitwise."""
    ckpt = torch.load(REFERENCE / "unet3d.ckpt", map_location="cpu", weights_only=True)
    net = build_model(ckpt["arch"], ckpt["model_config"])
    result = net.load_state_dict(ckpt["state_dict"], strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    model, meta = load_model(REFERENCE / "unet3d.ckpt")
    assert meta["arch"] == "unet3d"
    x = np.load(REFERENCE / "input.npy")
    expected = np.load(REFERENCE / "output.npy")
    got = predict_volume(model, x, tile_yx=32, overlap=0.25, batch_size=2)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.ptp(expected))
    again = predict_volume(model, x, tile_yx=32, overlap=0.25, batch_size=2)
    assert np.array_equal(got, again)


# --------------------------------------------------------------------------- step script

FOVS = ["A/1/0", "A/1/1", "A/2/0"]
SCALE = (2.0, 0.325, 0.325)


def write_phase_plate(path: Path, shape=(2, 6, 40, 52)) -> dict:
    raw = {}
    with io.create_plate(path, ["Phase3D"]) as plate:
        for i, fov in enumerate(FOVS):
            x = np.random.default_rng(i).normal(0.02, 0.01, size=shape).astype(np.float32)
            pos = io.write_fov(plate, fov, x[:, None], SCALE)
            fs, ts = fov_statistics(x, stride=4)
            pos.zattrs.update(
                io.to_jsonable(
                    {
                        "normalization": {
                            "Phase3D": {"fov_statistics": fs, "timepoint_statistics": ts}
                        }
                    }
                )
            )
            raw[fov] = (x, fs)
    return raw


def run_predict_step(tmp_path, ckpt, phase, fovs, target="nucleus", overwrite=True):
    out = tmp_path / "prediction.zarr"
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(ckpt=str(ckpt), phase=str(phase)),
        output=types.SimpleNamespace(store=str(out)),
        params=types.SimpleNamespace(
            target=target,
            fovs=fovs,
            settings={"tile_yx": 32, "overlap": 0.25, "batch_size": 4, "overwrite": overwrite},
            device="cpu",
        ),
        log=[],
        threads=1,
        rule="predict",
    )
    runpy.run_path(str(STEP), init_globals={"snakemake": ns})
    return out


def test_predict_step_identity_writes_normalized_phase(tmp_path, restore_threads):
    phase = tmp_path / "phase.zarr"
    raw = write_phase_plate(phase)
    ckpt = tmp_path / "model.ckpt"
    torch.save(checkpoint(model_settings({"arch": "identity"}), {}, 0, 1.0, target="er"), ckpt)
    out = run_predict_step(tmp_path, ckpt, phase, ["A/1/1", "A/2/0"], target="er")
    with io.open_plate(out) as plate:
        assert io.fov_names(plate) == ["A/1/1", "A/2/0"]
        for fov in ("A/1/1", "A/2/0"):
            pos = plate[fov]
            assert pos.channel_names == ["er_prediction"]
            assert pos["0"].shape == (2, 1, 6, 40, 52) and pos["0"].dtype == np.float32
            assert io.scale_zyx(pos) == pytest.approx(SCALE)
            x, stats = raw[fov]
            expected = normalize(x, stats, "median_iqr")
            np.testing.assert_allclose(io.read_channel(pos, "er_prediction", fov), expected, 1e-5)
        assert plate.zattrs["prediction"]["arch"] == "identity"


def test_predict_step_unet_and_target_check(tmp_path, restore_threads):
    phase = tmp_path / "phase.zarr"
    raw = write_phase_plate(phase)
    ckpt = tmp_path / "model.ckpt"
    model = random_unet_checkpoint(ckpt, target="nucleus")
    out = run_predict_step(tmp_path, ckpt, phase, ["A/1/0"])
    with io.open_plate(out) as plate:
        pred = io.read_channel(plate["A/1/0"], "nucleus_prediction", "A/1/0")
    x, stats = raw["A/1/0"]
    expected = predict_volume(model, normalize(x[1], stats, "median_iqr"), tile_yx=32)
    np.testing.assert_allclose(pred[1], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(io.InputError, match="trained for target 'nucleus', not 'er'"):
        run_predict_step(tmp_path, ckpt, phase, ["A/1/0"], target="er")
    with pytest.raises(io.InputError, match=r"FOV\(s\) \['B/1/0'\] not found"):
        run_predict_step(tmp_path, ckpt, phase, ["B/1/0"])


def test_predict_step_refuses_to_overwrite_and_checks_the_checkpoint_first(
    tmp_path, restore_threads
):
    phase = tmp_path / "phase.zarr"
    write_phase_plate(phase)
    ckpt = tmp_path / "model.ckpt"
    random_unet_checkpoint(ckpt, target="nucleus")
    out = run_predict_step(tmp_path, ckpt, phase, ["A/1/0"])
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(io.InputError, match=r"prediction\.zarr: a prediction store exists"):
        run_predict_step(tmp_path, ckpt, phase, ["A/1/0"], overwrite=False)
    assert sorted(p.name for p in out.rglob("*")) == before  # untouched
    placeholder = tmp_path / "CHANGE_ME.ckpt"
    placeholder.write_bytes(b"")
    shutil.rmtree(out)
    with pytest.raises(io.InputError, match="CHANGE_ME.ckpt: not a readable torch checkpoint"):
        run_predict_step(tmp_path, placeholder, phase, ["A/1/0"])
    assert not out.exists()  # failed before any work
    with pytest.raises(io.InputError, match="missing.ckpt: checkpoint not found"):
        run_predict_step(tmp_path, tmp_path / "missing.ckpt", phase, ["A/1/0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_cuda_matches_cpu(tmp_path):
    path = tmp_path / "model.ckpt"
    random_unet_checkpoint(path)
    zyx = np.random.default_rng(3).normal(size=(8, 64, 80)).astype(np.float32)
    cpu = predict_volume(load_model(path, "cpu")[0], zyx, tile_yx=32)
    gpu = predict_volume(load_model(path, "cuda")[0], zyx, tile_yx=32, device="cuda")
    assert np.corrcoef(cpu.ravel(), gpu.ravel())[0, 1] > 0.99  # bf16 autocast on CUDA
