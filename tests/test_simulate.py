import runpy
import types

import numpy as np
import pytest

from vsbench import io
from vsbench import simulate as sim
from vsbench.config import simulated_fov_names

OPTICS = {
    "wavelength_um": 0.45,
    "na_detection": 0.55,
    "na_illumination": 0.4,
    "index_media": 1.0,
    "pixel_size_um": {"z": 2.0, "y": 0.325, "x": 0.325},
}
PX = (2.0, 0.325, 0.325)


def manifest(**simulate):
    block = {
        "cell_type": "a549",
        "seed": 5,
        "shape": [8, 48, 48],
        "timepoints": 2,
        "wells": {"A/1": "mock", "B/2": "zikv"},
        "fovs_per_well": 2,
        "well_radius_um": 100.0,
        "max_zenith": 0.3,
    }
    block.update(simulate)
    return {
        "simulate": block,
        "optics": OPTICS,
        "brightfield": "BF",
        "channels": {"Nucleus": "nucleus", "ER": "er", "Mito": "mito", "Membrane": "membrane"},
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
    }


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_simulation_is_deterministic_per_seed():
    spec = sim.resolve_manifest(manifest(wells={"A/1": "denv"}, fovs_per_well=2))
    first = list(sim.simulate_fovs(spec, batch=2))
    again = list(sim.simulate_fovs(spec, batch=1))  # batching must not change anything
    for a, b in zip(first, again, strict=True):
        assert a["fov"] == b["fov"] and a["attrs"] == b["attrs"]
        np.testing.assert_array_equal(a["raw"], b["raw"])
        np.testing.assert_array_equal(a["truth"], b["truth"])
    other = list(sim.simulate_fovs(sim.resolve_manifest(manifest(wells={"A/1": "denv"}, seed=6))))
    assert not np.array_equal(first[0]["truth"][:, 1], other[0]["truth"][:, 1])
    assert not np.array_equal(first[0]["raw"], other[0]["raw"])
    # two FOVs of one plate are different phantoms
    assert not np.array_equal(first[0]["truth"][:, 1], first[1]["truth"][:, 1])


def test_step_writes_plates_readable_with_iohub(tmp_path):
    from iohub.ngff import open_ome_zarr

    m = manifest()
    out = types.SimpleNamespace(raw=str(tmp_path / "raw.zarr"), truth=str(tmp_path / "truth.zarr"))
    params = types.SimpleNamespace(dataset="tiny", manifest=m)
    snakemake = types.SimpleNamespace(
        input=types.SimpleNamespace(), output=out, params=params, log=[], threads=1, rule="simulate"
    )
    runpy.run_path("src/vsbench/steps/simulate.py", init_globals={"snakemake": snakemake})

    expected_fovs = simulated_fov_names(m["simulate"])
    assert io.list_plate_fovs(out.raw) == expected_fovs == io.list_plate_fovs(out.truth)
    layout = {f["fov"]: f for f in sim.fov_layout(m["simulate"])}
    with (
        open_ome_zarr(out.raw, layout="hcs", mode="r") as raw,
        open_ome_zarr(out.truth, layout="hcs", mode="r") as truth,
    ):
        assert raw.channel_names == ["BF", "Nucleus", "ER", "Mito", "Membrane"]
        assert truth.channel_names == list(sim.TRUTH_CHANNELS)
        assert raw.zattrs["simulation"]["dataset"] == "tiny"
        assert raw.zattrs["simulation"]["optics"] == OPTICS
        assert raw.zattrs["simulation"]["simulate"]["cell_type"] == "a549"
        assert sorted(name for name, _ in raw.positions()) == expected_fovs
        for fov in expected_fovs:
            r, t = raw[fov], truth[fov]
            assert r["0"].shape == (2, 5, 8, 48, 48) and r["0"].dtype == np.float32
            assert t["0"].shape == (2, 6, 8, 48, 48) and t["0"].dtype == np.float32
            assert r["0"].chunks == (1, 1, 8, 48, 48)
            assert io.scale_zyx(r) == pytest.approx(PX) and io.scale_zyx(t) == pytest.approx(PX)
            attrs = r.zattrs["simulation"]
            assert attrs == t.zattrs["simulation"]
            assert attrs["zenith"] == pytest.approx(layout[fov]["zenith"])
            assert attrs["azimuth"] == pytest.approx(layout[fov]["azimuth"])
            assert attrs["position_um"] == pytest.approx(layout[fov]["position_um"])
            assert attrs["condition"] == ("mock" if fov.startswith("A/1") else "zikv")
            assert attrs["cell_type"] == "a549" and attrs["seed"] == 5
            data = np.asarray(r["0"])
            assert np.isfinite(data).all()
            labels = np.asarray(t["0"][:, 1])
            assert np.array_equal(labels, np.rint(labels)) and labels.max() >= 1
            nuclei = np.asarray(t["0"][:, 2])
            assert set(np.unique(nuclei)) <= set(np.unique(labels))
            for c in (3, 4, 5):
                assert set(np.unique(np.asarray(t["0"][:, c]))) <= {0.0, 1.0}


def test_meniscus_law():
    block = {"wells": {"A/1": "mock", "A/2": "mock"}, "fovs_per_well": 9, "seed": 3}
    block.update(well_radius_um=150.0, max_zenith=0.4)
    layout = sim.fov_layout(block)
    assert [f["fov"] for f in layout] == simulated_fov_names(block)
    for well in ("A/1", "A/2"):
        fovs = sorted((f for f in layout if f["well"] == well), key=lambda f: f["radius_um"])
        radii = np.array([np.hypot(*f["position_um"]) for f in fovs])
        zen = np.array([f["zenith"] for f in fovs])
        assert np.all(np.diff(radii) > 0) and np.all(np.diff(zen) > 0)
        np.testing.assert_allclose(zen, 0.4 * (radii / 150.0) ** 2, rtol=1e-6)
        assert zen.max() <= 0.4 and radii.max() <= 150.0
        for f in fovs:  # radial, outward: azimuth is the direction from the well centre to the FOV
            y, x = f["position_um"]
            assert np.cos(f["azimuth"] - np.arctan2(y, x)) == pytest.approx(1.0)
    azimuths = {f["well"]: f["azimuth"] for f in layout if f["fov"].endswith("/0")}
    assert azimuths["A/1"] != pytest.approx(azimuths["A/2"])  # per-well offset


def test_phenotypes_are_measurable():
    from skimage.measure import label

    shape = (12, 128, 128)

    def phantom(condition):
        return sim.make_phantom(shape, "a549", condition, np.random.default_rng(4), PX, 2)

    mock, denv, zikv = phantom("mock"), phantom("denv"), phantom("zikv")
    # same seed → same cells; only the organelles change with the condition
    np.testing.assert_array_equal(mock["cell_labels"], denv["cell_labels"])

    def er_fraction(p):
        return p["er"].sum() / (p["cell_labels"] > 0).sum()

    def mito_size(p):
        sizes = [np.bincount(label(m).ravel())[1:] for m in p["mito"]]
        return float(np.mean(np.concatenate(sizes)))

    assert er_fraction(denv) > 1.5 * er_fraction(mock)
    assert mito_size(zikv) < 0.7 * mito_size(mock)
    assert max(label(zikv["mito"][0]).max(), 1) > label(mock["mito"][0]).max()

    # organelles sit where they belong; labels are consistent
    for p in (mock, denv, zikv):
        cells = p["cell_labels"] > 0
        assert not (p["er"] & ~cells).any() and not (p["mito"] & ~cells).any()
        assert not (p["er"] & p["nucleus"]).any() and not (p["mito"] & p["membrane"]).any()
        np.testing.assert_array_equal(p["nucleus_labels"] > 0, p["nucleus"])
        nuc = p["nucleus_labels"] > 0
        np.testing.assert_array_equal(p["nucleus_labels"][nuc], p["cell_labels"][nuc])
    # nucleus and membrane carry distinct refractive index from the cytoplasm
    dn = mock["delta_n"]
    cyto = (
        (mock["cell_labels"] > 0)
        & ~mock["nucleus"]
        & ~mock["membrane"]
        & ~mock["er"]
        & ~mock["mito"]
    )
    assert dn[mock["nucleus"]].mean() > 1.3 * dn[cyto].mean()
    assert dn[mock["membrane"]].mean() > 1.3 * dn[cyto].mean()
    assert (dn[~(mock["cell_labels"] > 0)] == 0).all()


def test_cell_types_and_motion():
    ipsc = sim.make_phantom((12, 128, 128), "ipsc", "mock", np.random.default_rng(2), PX, 3)
    a549 = sim.make_phantom((12, 128, 128), "a549", "mock", np.random.default_rng(2), PX, 3)
    lab_i, lab_a = ipsc["cell_labels"], a549["cell_labels"]
    assert lab_i[0].max() > lab_a[0].max()  # iPSC colonies are denser
    size_i = np.bincount(lab_i[0].ravel())[1:].mean()
    size_a = np.bincount(lab_a[0].ravel())[1:].mean()
    assert size_a > size_i  # A549 cells are larger
    # cells drift a little between timepoints: centroids move 0 < d <= ~2 px per step
    for t in (1, 2):
        for i in range(1, lab_i[0].max() + 1):
            c0 = np.argwhere(lab_i[t - 1] == i).mean(0)
            c1 = np.argwhere(lab_i[t] == i).mean(0)
            assert np.hypot(*(c1 - c0)[1:]) < 4.0
    assert not np.array_equal(lab_i[0], lab_i[1])


def test_brightfield_noise_free_matches_waveorder():
    import torch
    from waveorder.models import phase_thick_3d

    p = sim.make_phantom((12, 64, 64), "ipsc", "mock", np.random.default_rng(1), PX, 2)
    phase = sim.phase_cycles(p["delta_n"], OPTICS)
    np.testing.assert_allclose(phase, p["delta_n"] * 2.0 / 0.45, rtol=1e-6)
    zenith, azimuth = 0.25, -2.0
    ours = sim.brightfield(phase, OPTICS, zenith, azimuth)
    real_tf, _ = phase_thick_3d.calculate_transfer_function(
        (12, 64, 64), 0.325, 2.0, 0.45, 0, 1.0, 0.4, 0.55,
        tilt_angle_zenith=zenith, tilt_angle_azimuth=azimuth,
    )  # fmt: skip
    for t in range(2):
        ref = phase_thick_3d.apply_transfer_function(
            torch.as_tensor(phase[t]), real_tf, 0, sim.BF_BRIGHTNESS
        ).numpy()
        np.testing.assert_allclose(ours[t], ref, rtol=1e-6, atol=1e-4)
    # batched transfer functions equal one-at-a-time ones
    batched = sim.brightfield_transfer_function((12, 64, 64), OPTICS, [0.1, zenith], [1.0, azimuth])
    torch.testing.assert_close(batched[1], real_tf, rtol=1e-4, atol=1e-6)
    # the noisy image scatters around the expectation
    noisy = sim.brightfield(phase, OPTICS, zenith, azimuth, rng=np.random.default_rng(0))
    resid = noisy - ours
    expected = np.sqrt(sim.BF_BRIGHTNESS / sim.BF_GAIN + sim.BF_READ_NOISE**2)
    assert abs(resid.mean()) < 0.01 * expected and resid.std() == pytest.approx(expected, rel=0.05)


def test_fluorescence_noise_free_matches_waveorder():
    import torch
    from waveorder.models import isotropic_fluorescent_thick_3d as fl

    p = sim.make_phantom((12, 64, 64), "a549", "mock", np.random.default_rng(1), PX, 1)
    density = p["density_er"]
    ours = sim.fluorescence(density, OPTICS, emission_um=0.51, photons=1.0, background=0.0)
    otf = fl.calculate_transfer_function((12, 64, 64), 0.325, 2.0, 0.51, 0, 1.0, 0.55)
    ref = fl.apply_transfer_function(torch.as_tensor(density[0]), otf, 0, background=0).numpy()
    np.testing.assert_allclose(ours[0], ref, rtol=1e-5, atol=1e-6)
    # the PSF blurs (lower peak, same total) and noise is Poisson + read
    assert ours.max() < density.max() and ours.sum() == pytest.approx(density.sum(), rel=1e-3)
    noisy = sim.fluorescence(density, OPTICS, np.random.default_rng(0), emission_um=0.51)
    assert (
        noisy.dtype == np.float32 and abs(float(noisy.mean()) - (300 * density.mean() + 20)) < 0.5
    )


def test_true_tilt_reconstructs_better_than_flipped_or_untilted():
    import torch
    from waveorder.models import phase_thick_3d

    m = manifest(cell_type="ipsc", shape=[16, 96, 96], wells={"A/1": "mock"}, fovs_per_well=1)
    m["simulate"]["max_zenith"] = 0.5  # one FOV at r = R/sqrt(2) → zenith 0.25
    spec = sim.resolve_manifest(m)
    (item,) = sim.simulate_fovs(spec)
    zenith, azimuth = item["attrs"]["zenith"], item["attrs"]["azimuth"]
    assert zenith >= 0.2
    bf = torch.as_tensor(item["raw"][0, 0])
    truth = item["truth"][0, 0]

    def score(zen, azi):
        rec = phase_thick_3d.reconstruct(
            bf, 0.325, 2.0, 0.45, 0, 1.0, 0.4, 0.55,
            tilt_angle_zenith=zen, tilt_angle_azimuth=azi, regularization_strength=1e-3,
        )  # fmt: skip
        return corr(rec.numpy(), truth)

    true, flipped, flat = score(zenith, azimuth), score(zenith, azimuth + np.pi), score(0.0, 0.0)
    assert true > flat + 0.05 and true > flipped + 0.2, (true, flipped, flat)
    assert true > 0.3


def test_manifest_errors_name_the_key():
    bad = manifest()
    bad["channels"] = {"Golgi": "golgi", "ER": "er"}
    with pytest.raises(io.InputError, match="golgi"):
        sim.resolve_manifest(bad, "demo")
    bad = manifest(cell_type="hela")
    with pytest.raises(io.InputError, match="cell_type"):
        sim.resolve_manifest(bad, "demo")
    bad = manifest()
    bad["optics"] = {**OPTICS, "pixel_size_um": {"z": 2.0, "y": 0.3, "x": 0.4}}
    with pytest.raises(io.InputError, match="pixel_size_um"):
        sim.resolve_manifest(bad, "demo")
    spec = sim.resolve_manifest(
        {**manifest(), "simulate": {"cell_type": "ipsc", "wells": {"A/1": "mock"}}}
    )
    assert spec["simulate"]["shape"] == [16, 128, 128] and spec["simulate"]["fovs_per_well"] == 4
