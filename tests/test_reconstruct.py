"""reconstruct: tilt search and 3D phase against waveorder, and the step end to end.

Data are made here with waveorder's own forward model (phase_thick_3d
calculate_transfer_function + apply_transfer_function) from random-sphere phantoms.
"""

import math
import runpy
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vsbench import io
from vsbench import reconstruct as rc
from vsbench.preprocess import fov_statistics

STEP = Path(__file__).resolve().parents[1] / "src/vsbench/steps/reconstruct.py"
MANIFEST = {
    "optics": {
        "wavelength_um": 0.45,
        "na_detection": 0.55,
        "na_illumination": 0.4,
        "index_media": 1.0,
        "pixel_size_um": {"z": 2.0, "y": 0.325, "x": 0.325},
    },
    "brightfield": "BF",
    "channels": {"GFP": "er"},
}
SETTINGS = {
    "regularization": 1e-3,
    "z_padding": 0,
    "max_zenith": 0.35,
    "n_zenith": 8,
    "n_azimuth": 12,
    "loss_band": [0.125, 0.25],
}
ZEN_STEP = 0.35 / 7
AZI_STEP = 2 * math.pi / 12


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def optics():
    return rc.Optics.from_manifest(MANIFEST)


@pytest.fixture(scope="module")
def search(optics):
    return rc.TiltSearch(optics, SETTINGS, "cpu")


def phantom(shape, seed, n_spheres=12):
    """Random soft-edged spheres, 0.05-0.1 cycles/voxel, away from the z ends."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    dz, dyx = 2.0, 0.325
    zz, yy, xx = np.meshgrid(
        np.arange(nz) * dz, np.arange(ny) * dyx, np.arange(nx) * dyx, indexing="ij"
    )
    out = np.zeros(shape)
    for _ in range(n_spheres):
        c = rng.uniform([dz * nz * 0.25, 0, 0], [dz * nz * 0.75, ny * dyx, nx * dyx])
        r = rng.uniform(1.5, 4.0)
        d = np.sqrt(((zz - c[0]) * 0.5) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
        out = np.maximum(out, rng.uniform(0.05, 0.1) / (1 + np.exp((d - r) / (0.5 * dyx))))
    return out.astype(np.float32)


def forward(optics, phase, zenith, azimuth, seed=0, noise=0.3):
    """Brightfield stack through waveorder's tilted forward model + Gaussian noise."""
    from waveorder.models import phase_thick_3d

    real_tf, _ = phase_thick_3d.calculate_transfer_function(
        phase.shape,
        z_padding=0,
        tilt_angle_zenith=zenith,
        tilt_angle_azimuth=azimuth,
        **optics.tf_kwargs(),
    )
    data = phase_thick_3d.apply_transfer_function(
        torch.as_tensor(phase), real_tf, z_padding=0, brightness=1e3
    ).numpy()
    rng = np.random.default_rng(seed)
    return (data + noise * (data - 1e3).std() * rng.standard_normal(data.shape)).astype(np.float32)


def angle_error(a, b):
    return abs((a - b + math.pi) % (2 * math.pi) - math.pi)


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# --------------------------------------------------------------------------- optics, loss


def test_optics_from_manifest_and_errors():
    o = rc.Optics.from_manifest(MANIFEST)
    assert o.pixel_size_zyx == (2.0, 0.325, 0.325)
    assert o.tf_kwargs()["numerical_aperture_detection"] == 0.55
    bad = {"optics": {**MANIFEST["optics"], "pixel_size_um": {"z": 2.0, "y": 0.3, "x": 0.4}}}
    with pytest.raises(io.InputError, match="square pixels"):
        rc.Optics.from_manifest(bad, where="m.yaml")
    with pytest.raises(io.InputError, match="m.yaml: optics"):
        rc.Optics.from_manifest({"optics": {"wavelength_um": 0.5}}, where="m.yaml")


def test_midband_loss_matches_waveorder():
    from waveorder.optim.losses import MidbandPowerLossSettings, build_loss_fn

    x = torch.randn(3, 5, 40, 48, generator=torch.Generator().manual_seed(0))
    ref_fn = build_loss_fn(
        MidbandPowerLossSettings(midband_fractions=[0.125, 0.25]),
        NA_det=0.55,
        wavelength=0.45,
        pixel_size=0.325,
    )
    ours = rc.midband_loss(x, 0.325, 0.45, 0.55, (0.125, 0.25))
    ref = torch.stack([ref_fn(x[b]) for b in range(3)])
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


def test_symmetric_bank_matches_waveorder(optics):
    """The D4 images equal waveorder's own TFs away from the Nyquist row/column."""
    s = rc.TiltSearch(optics, {**SETTINGS, "n_zenith": 3, "n_azimuth": 8}, "cpu")
    shape = (8, 32, 32)
    zen, azi, tfs, _ = s.bank(shape)
    assert len(zen) == 1 + 2 * 8
    direct = s.transfer_functions(shape, zen, azi)
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[16, :] = keep[:, 16] = False
    err = (tfs - direct).abs()[..., keep].max() / direct.abs().max()
    assert float(err) < 1e-5
    # and each of the 8 symmetries on its own, from an azimuth that is on no grid
    a = 0.37
    for amap, tfmap in rc.SYMMETRIES:
        pair = torch.tensor([a, amap(a)], dtype=torch.float32)
        tf = s.transfer_functions(shape, torch.full((2,), 0.3), pair)
        err = (tfmap(tf[0]) - tf[1]).abs()[..., keep].max() / tf.abs().max()
        assert float(err) < 1e-5


def test_select_crop_prefers_structure():
    zyx = np.ones((4, 96, 128), np.float32)
    zyx[:, 40:60, 90:110] += np.random.default_rng(0).normal(0, 0.1, (4, 20, 20))
    y0, x0, size = rc.select_crop(zyx, 48)
    assert size == 48
    assert y0 <= 40 and y0 + size >= 60 and x0 <= 90 and x0 + size >= 110
    assert rc.select_crop(zyx[:, :33, :40], 64) == (0, 0, 32)  # even, whole FOV


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    ("zenith", "azimuth", "seed"), [(0.25, 1.0, 1), (0.3, 4.0, 2), (0.17, 2.5, 3)]
)
def test_estimate_tilt_recovers_simulated_tilt(optics, search, zenith, azimuth, seed):
    truth = phantom((16, 64, 64), seed)
    zyx = forward(optics, truth, zenith, azimuth, seed=seed)
    est = rc.estimate_tilt(zyx, optics, SETTINGS, search=search)
    assert abs(est["zenith"] - zenith) <= ZEN_STEP
    assert angle_error(est["azimuth"], azimuth) <= AZI_STEP
    assert angle_error(est["azimuth"], azimuth + math.pi) > math.pi / 2  # not azimuth + π
    assert 0 <= est["azimuth"] < 2 * math.pi
    assert est["iterations"] > 1 + 7 * 12  # coarse grid + refinement
    assert est["loss"] < 0
    # the loss is what was minimised: the true tilt's loss is at most marginally lower
    assert est["loss"] <= search.loss_at(zyx, zenith, azimuth, est["crop"]) * (1 - 1e-2)


def test_estimated_tilt_beats_untilted_and_azimuth_plus_pi(optics, search):
    truth = phantom((16, 64, 64), 7)
    zyx = forward(optics, truth, 0.3, 5.2, seed=7)
    est = search(zyx)
    tzyx = zyx[None]
    c_est = corr(rc.reconstruct_phase(tzyx, optics, est["zenith"], est["azimuth"]), truth)
    c_flat = corr(rc.reconstruct_phase(tzyx, optics, 0.0, 0.0), truth)
    c_flip = corr(rc.reconstruct_phase(tzyx, optics, 0.3, 5.2 + math.pi), truth)
    c_true = corr(rc.reconstruct_phase(tzyx, optics, 0.3, 5.2), truth)
    assert c_est > c_flat + 0.05
    assert c_est > c_flip + 0.2
    assert c_est > c_true - 0.02


def test_untilted_data_gives_small_zenith(optics, search):
    zyx = forward(optics, phantom((16, 64, 64), 11), 0.0, 0.0, seed=11)
    assert search(zyx)["zenith"] <= ZEN_STEP


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("z_padding", [0, 2])
def test_reconstruct_phase_matches_waveorder(optics, z_padding):
    from waveorder.models import phase_thick_3d

    truth = phantom((12, 48, 48), 5)
    tzyx = np.stack([forward(optics, truth, 0.2, 0.7, seed=s) for s in (0, 1, 2)])
    ours = rc.reconstruct_phase(tzyx, optics, 0.2, 0.7, 1e-3, z_padding, batch_size=2)
    ref = np.stack(
        [
            phase_thick_3d.reconstruct(
                torch.as_tensor(zyx),
                z_padding=z_padding,
                tilt_angle_zenith=0.2,
                tilt_angle_azimuth=0.7,
                regularization_strength=1e-3,
                **optics.tf_kwargs(),
            ).numpy()
            for zyx in tzyx
        ]
    )
    assert ours.shape == tzyx.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_bad_brightfield_is_input_error(optics):
    with pytest.raises(io.InputError, match="positive mean"):
        rc.check_brightfield(np.zeros((4, 8, 8), np.float32), "p.zarr FOV A/1/0")
    bad = np.ones((4, 8, 8), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(io.InputError, match="non-finite"):
        rc.check_brightfield(bad, "p.zarr FOV A/1/0")
    with pytest.raises(io.InputError, match="Z >= 2"):
        rc.reconstruct_phase(np.ones((1, 1, 8, 8)), optics)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(optics):
    truth = phantom((16, 64, 64), 3)
    zyx = forward(optics, truth, 0.25, 1.0, seed=3)
    cpu = rc.TiltSearch(optics, SETTINGS, "cpu")(zyx)
    gpu = rc.TiltSearch(optics, SETTINGS, "cuda")(zyx)
    assert abs(cpu["zenith"] - gpu["zenith"]) < 1e-6
    assert angle_error(cpu["azimuth"], gpu["azimuth"]) < 1e-6
    a = rc.reconstruct_phase(zyx[None], optics, 0.25, 1.0, device="cpu")
    b = rc.reconstruct_phase(zyx[None], optics, 0.25, 1.0, device="cuda")
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(a).max())


# --------------------------------------------------------------------------- step


def run_step(store, out_dir, manifest=MANIFEST, settings=SETTINGS):
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(store=str(store)),
        output=types.SimpleNamespace(
            phase=str(out_dir / "phase.zarr"), tilt=str(out_dir / "tilt.csv")
        ),
        params=types.SimpleNamespace(
            dataset="tiny", manifest=manifest, settings=settings, device="cpu"
        ),
        log=[],
        threads=1,
        rule="reconstruct",
    )
    runpy.run_path(str(STEP), init_globals={"snakemake": ns})


def test_step_end_to_end(tmp_path, make_plate, optics):
    shape = (8, 48, 48)
    fovs, attrs, truths = {}, {}, {}
    for k, (fov, tilt) in enumerate({"A/1/0": (0.3, 2.0), "B/2/0": None}.items()):
        truth = phantom(shape, 20 + k, n_spheres=8)
        zen, azi = tilt or (0.0, 0.0)
        bf = np.stack([forward(optics, truth, zen, azi, seed=10 * k + t) for t in range(2)])
        gfp = np.random.default_rng(k).poisson(50, bf.shape).astype(np.float32)
        fovs[fov] = np.stack([bf, gfp], axis=1)  # (T, C, Z, Y, X)
        truths[fov] = truth
        if tilt:
            attrs[fov] = {"simulation": {"zenith": zen, "azimuth": azi - 2 * math.pi}}
    store = make_plate(tmp_path / "preprocessed.zarr", fovs, ["BF", "GFP"], attrs=attrs)
    settings = {**SETTINGS, "sample_stride": 8}
    run_step(store, tmp_path, settings=settings)

    tilt = pd.read_csv(tmp_path / "tilt.csv")
    expected_cols = ["fov", "t", "subtile", "zenith", "azimuth", "z_offset", "loss"]
    expected_cols += ["iterations", "skipped", "method", "wall_s", "true_zenith", "true_azimuth"]
    assert list(tilt.columns) == expected_cols
    assert list(zip(tilt.fov, tilt.t, strict=True)) == [
        ("A/1/0", 0),
        ("A/1/0", 1),
        ("B/2/0", 0),
        ("B/2/0", 1),
    ]
    assert tilt.skipped.tolist() == [False, True, False, True]
    assert (tilt.method == "grid").all() and (tilt.subtile == 0).all()
    assert (tilt.z_offset == 0.0).all()
    assert (tilt.iterations[~tilt.skipped] > 85).all() and (
        tilt.iterations[tilt.skipped] == 1
    ).all()
    a = tilt[tilt.fov == "A/1/0"]
    assert a.zenith.nunique() == 1 and a.azimuth.nunique() == 1  # t=0 estimate reused
    assert a.true_zenith.iloc[0] == pytest.approx(0.3)
    assert a.true_azimuth.iloc[0] == pytest.approx(2.0)  # wrapped to [0, 2π)
    assert abs(a.zenith.iloc[0] - 0.3) <= ZEN_STEP
    assert angle_error(a.azimuth.iloc[0], 2.0) <= AZI_STEP
    b = tilt[tilt.fov == "B/2/0"]
    assert b.true_zenith.isna().all() and b.true_azimuth.isna().all()
    assert np.isfinite(tilt.loss).all() and (tilt.wall_s >= 0).all()

    with io.open_plate(tmp_path / "phase.zarr") as plate:
        assert io.fov_names(plate) == ["A/1/0", "B/2/0"]
        samples = []
        for fov in io.fov_names(plate):
            pos = plate[fov]
            assert pos.channel_names == ["Phase3D"]
            arr = np.asarray(pos["0"][:])
            assert arr.shape == (2, 1, *shape) and arr.dtype == np.float32
            assert io.scale_zyx(pos) == pytest.approx((2.0, 0.325, 0.325))
            row = tilt[(tilt.fov == fov) & (tilt.t == 0)].iloc[0]
            bf = np.asarray(fovs[fov][:, 0])
            expected = rc.reconstruct_phase(bf, optics, row.zenith, row.azimuth)
            np.testing.assert_allclose(arr[:, 0], expected, atol=1e-6 * np.abs(expected).max())
            assert corr(arr[0, 0], truths[fov]) > 0.3
            norm = io.channel_statistics(pos, "Phase3D")
            fov_stats, per_t = fov_statistics(arr[:, 0], stride=8)
            assert norm["fov_statistics"] == pytest.approx(fov_stats)
            assert set(norm["timepoint_statistics"]) == {"0", "1"}
            assert norm["timepoint_statistics"]["1"] == pytest.approx(per_t["1"])
            samples.append(arr[:, 0, :, ::8, ::8].ravel())
        ds = io.channel_statistics(plate, "Phase3D")["dataset_statistics"]
        allv = np.concatenate(samples)
        assert ds["mean"] == pytest.approx(float(allv.mean()), rel=1e-5)
        assert ds["max"] == pytest.approx(float(allv.max()))


def test_step_missing_brightfield_channel(tmp_path, make_plate):
    data = np.ones((1, 1, 4, 16, 16), np.float32)
    store = make_plate(tmp_path / "pre.zarr", {"A/1/0": data}, ["GFP"])
    with pytest.raises(io.InputError, match=r"pre\.zarr FOV A/1/0: channel 'BF' not found"):
        run_step(store, tmp_path)
    assert not (tmp_path / "phase.zarr").exists()
    assert not (tmp_path / "tilt.csv").exists()


def test_step_bad_optics(tmp_path, make_plate):
    data = np.ones((1, 2, 4, 16, 16), np.float32)
    store = make_plate(tmp_path / "pre.zarr", {"A/1/0": data}, ["BF", "GFP"])
    manifest = {**MANIFEST, "optics": {"wavelength_um": 0.45}}
    with pytest.raises(io.InputError, match="dataset 'tiny' manifest: optics"):
        run_step(store, tmp_path, manifest=manifest)
