import json
import runpy
import types

import dask.array as da
import numpy as np
import pytest

from vsbench import io
from vsbench import preprocess as pp


def test_statistics_match_numpy_on_numpy_and_dask():
    x = np.random.default_rng(0).gamma(2.0, 3.0, size=(4, 8, 64, 64)).astype(np.float32)
    for arr in (x, da.from_array(x, chunks=(1, 8, 32, 32))):
        s = pp.statistics_from_sample(arr)
        assert s["mean"] == pytest.approx(float(x.mean()), rel=1e-5)
        assert s["std"] == pytest.approx(float(x.std()), rel=1e-4)
        assert s["median"] == pytest.approx(float(np.percentile(x, 50)), rel=1e-5)
        p25, p75 = np.percentile(x, [25, 75])
        assert s["iqr"] == pytest.approx(float(p75 - p25), rel=1e-5)
        for q in (1, 5, 95, 99):
            assert s[f"p{q}"] == pytest.approx(float(np.percentile(x, q)), rel=1e-5)
        assert (s["min"], s["max"]) == (float(x.min()), float(x.max()))


def test_fov_statistics_use_the_strided_sample():
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    fov, per_t = pp.fov_statistics(x, 32)
    sample = x[..., ::32, ::32]
    assert fov["mean"] == pytest.approx(float(sample.mean()), rel=1e-5)
    assert per_t["1"]["max"] == float(sample[1].max())


def test_normalize_methods():
    s = {"median": 2.0, "iqr": 4.0, "mean": 1.0, "std": 2.0, "p1": 0.0, "p99": 10.0}
    x = np.array([0.0, 2.0, 10.0])
    np.testing.assert_allclose(pp.normalize(x, s, "median_iqr"), [-0.5, 0.0, 2.0])
    np.testing.assert_allclose(pp.normalize(x, s, "mean_std"), [-0.5, 0.5, 4.5])
    np.testing.assert_allclose(pp.normalize(x, s, "p1_p99"), [-1.0, -0.6, 1.0])
    with pytest.raises(ValueError, match="unknown normalization"):
        pp.normalize(x, s, "zscore")


@pytest.mark.parametrize(
    "shape, channels, scale, message",
    [
        ((3, 8, 8), ["BF"], (1, 1, 1), "5-D TCZYX"),
        ((1, 1, 1, 8, 8), ["BF"], (1, 1, 1), "z-stack"),
        ((1, 2, 4, 8, 8), ["BF"], (1, 1, 1), "2 channels but metadata names 1"),
        ((1, 1, 4, 8, 8), ["GFP"], (1, 1, 1), r"missing channel\(s\) \['BF'\]"),
        ((1, 1, 4, 8, 8), ["BF"], (1, -0.3, 1), "pixel size must be positive"),
    ],
)
def test_validate_fov_errors(shape, channels, scale, message):
    with pytest.raises(io.InputError, match=message):
        pp.validate_fov(np.zeros(shape), channels, ["BF"], scale, "raw.zarr FOV A/1/0")


def test_check_values_rejects_nan_and_all_zero():
    x = np.ones((2, 4, 4))
    x[0, 1, 1] = np.nan
    with pytest.raises(io.InputError, match="1 non-finite voxel"):
        pp.check_values(x, "FOV A/1/0")
    with pytest.raises(io.InputError, match="all voxels are zero"):
        pp.check_values(np.zeros((2, 4, 4)), "FOV A/1/0")


MANIFEST = {
    "optics": {
        "wavelength_um": 0.45,
        "na_detection": 0.55,
        "na_illumination": 0.4,
        "index_media": 1.0,
        "pixel_size_um": {"z": 2.0, "y": 0.325, "x": 0.325},
    },
    "brightfield": "BF",
    "channels": {"Nuc": "nucleus"},
}


def _run(tmp_path, raw, manifest=MANIFEST):
    out = tmp_path / "pre.zarr"
    sm = types.SimpleNamespace(
        input=types.SimpleNamespace(raw=str(raw)),
        output=types.SimpleNamespace(store=str(out)),
        params=types.SimpleNamespace(manifest=manifest, sample_stride=4),
        log=[],
        threads=1,
        rule="preprocess",
    )
    runpy.run_path("src/vsbench/steps/preprocess.py", init_globals={"snakemake": sm})
    return out


def test_step_rechunks_and_writes_statistics(tmp_path, make_plate, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    rng = np.random.default_rng(2)
    fovs = {f: rng.normal(5, 1, size=(2, 3, 4, 16, 16)) for f in ("A/1/0", "A/1/1")}
    # an extra channel not in the manifest is dropped; channel order follows the manifest
    raw = make_plate(
        tmp_path / "raw.zarr",
        fovs,
        ["Extra", "Nuc", "BF"],
        attrs={"A/1/0": {"simulation": {"zenith": 0.1}}},
    )
    out = _run(tmp_path, raw)
    with io.open_plate(out) as plate:
        assert plate.channel_names == ["BF", "Nuc"]
        pos = plate["A/1/0"]
        assert pos["0"].chunks == (1, 1, 4, 16, 16)
        np.testing.assert_allclose(io.read_channel(pos, "Nuc", "x"), fovs["A/1/0"][:, 1], rtol=1e-6)
        stats = io.channel_statistics(pos, "Nuc")
        expect = fovs["A/1/0"][:, 1, :, ::4, ::4]
        assert stats["fov_statistics"]["mean"] == pytest.approx(float(expect.mean()), rel=1e-5)
        assert set(stats["timepoint_statistics"]) == {"0", "1"}
        assert dict(pos.zattrs)["simulation"] == {"zenith": 0.1}
        ds = io.channel_statistics(plate, "BF")["dataset_statistics"]
        both = np.concatenate([fovs[f][:, 2, :, ::4, ::4].ravel() for f in sorted(fovs)])
        assert ds["median"] == pytest.approx(float(np.median(both)), rel=1e-5)
        json.dumps(dict(plate.zattrs))  # attributes are plain JSON


def test_step_rejects_bad_input_naming_fov(tmp_path, make_plate, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    good = np.ones((1, 2, 4, 8, 8))
    bad = good.copy()
    bad[0, 1, 0, 0, 0] = np.nan
    raw = make_plate(tmp_path / "raw.zarr", {"A/1/0": good, "A/1/1": bad}, ["BF", "Nuc"])
    with pytest.raises(io.InputError, match="FOV A/1/1 channel Nuc: 1 non-finite"):
        _run(tmp_path, raw)
    raw2 = make_plate(
        tmp_path / "raw2.zarr", {"A/1/0": good}, ["BF", "Nuc"], scale=(1.0, 0.325, 0.325)
    )
    with pytest.raises(io.InputError, match="differs from the manifest optics"):
        _run(tmp_path, raw2)
    raw3 = make_plate(tmp_path / "raw3.zarr", {"A/1/0": good}, ["BF", "GFP"])
    with pytest.raises(io.InputError, match=r"missing channel\(s\) \['Nuc'\]"):
        _run(tmp_path, raw3)


def test_step_runs_by_hand_outside_snakemake(tmp_path, make_plate, repo_root):
    import subprocess
    import sys

    raw = make_plate(tmp_path / "raw.zarr", {"A/1/0": np.ones((1, 2, 4, 8, 8))}, ["BF", "Nuc"])
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"manifest": MANIFEST, "sample_stride": 4}))
    out, log = tmp_path / "pre.zarr", tmp_path / "pre.log"
    cmd = [
        sys.executable,
        "-m",
        "vsbench.steps",
        "preprocess",
        "--input",
        f"raw={raw}",
        "--output",
        f"store={out}",
        "--params",
        str(params),
        "--log",
        str(log),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr + log.read_text()
    assert "wrote" in log.read_text()
    with io.open_plate(out) as plate:
        assert plate.channel_names == ["BF", "Nuc"]


def test_step_rejects_empty_plate_and_corrupt_chunk(tmp_path, make_plate, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    group = make_plate(tmp_path / "group.zarr", {}, ["BF", "Nuc"])  # iohub writes no plate yet
    with pytest.raises(io.InputError, match="group.zarr: not an HCS plate"):
        _run(tmp_path, group)
    empty = make_plate(tmp_path / "empty.zarr", {"A/1/0": np.ones((1, 2, 4, 8, 8))}, ["BF", "Nuc"])
    meta = json.loads((empty / "zarr.json").read_text())
    meta["attributes"]["ome"]["plate"]["wells"] = []
    (empty / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(io.InputError, match="empty.zarr: plate has no FOVs"):
        _run(tmp_path, empty)
    raw = make_plate(tmp_path / "raw.zarr", {"A/1/0": np.ones((1, 2, 4, 8, 8))}, ["BF", "Nuc"])
    chunk = next(p for p in (raw / "A/1/0/0").rglob("*") if p.is_file() and p.name == "0")
    chunk.write_bytes(b"garbage")
    with pytest.raises(io.InputError, match="raw.zarr FOV A/1/0: cannot read array data"):
        _run(tmp_path, raw)
    assert not (tmp_path / "pre.zarr").exists() or not any((tmp_path / "pre.zarr").rglob("c"))
