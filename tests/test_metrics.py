"""Metrics: parity with skimage / numpy / torch-fidelity, hand-built masks, the step script."""

from __future__ import annotations

import math
import runpy
import types

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from vsbench import metrics as M

PAIRS = [((16, 32, 32), 0), ((11, 24, 40), 1), ((20, 16, 16), 2)]


def pair(shape, seed, noise=0.5):
    rng = np.random.default_rng(seed)
    from scipy import ndimage as ndi

    gt = ndi.gaussian_filter(rng.random(shape), 1.5) * 1000 + 50  # structured, arbitrary scale
    pred = 0.7 * gt + noise * gt.std() * rng.normal(size=shape) - 20
    return gt.astype(np.float32), pred.astype(np.float32)


def skimage_ssim(a, b):
    return structural_similarity(
        M.minmax(a),
        M.minmax(b),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
    )


# --------------------------------------------------------------------------- pixel


@pytest.mark.parametrize(("shape", "seed"), PAIRS)
def test_ssim_matches_skimage(shape, seed):
    gt, pred = pair(shape, seed)
    assert abs(M.ssim3d(gt, pred) - skimage_ssim(gt, pred)) <= 1e-4
    rng = np.random.default_rng(seed)
    a, b = rng.random(shape), rng.random(shape)  # uncorrelated noise volumes
    assert abs(M.ssim3d(a, b) - skimage_ssim(a, b)) <= 1e-4


def test_ssim_identity_and_thin_stacks():
    gt, pred = pair((16, 32, 32), 3)
    assert M.ssim3d(gt, gt) == pytest.approx(1.0)
    assert M.ssim3d(gt, 5 * gt + 2) == pytest.approx(1.0)  # min-max scaling first
    thin = M.ssim3d(gt[:4], pred[:4])  # fewer slices than the 11-tap window: skimage refuses
    assert np.isfinite(thin) and 0 < thin < 1


@pytest.mark.parametrize(("shape", "seed"), PAIRS)
def test_nrmse_psnr_pcc_match_references(shape, seed):
    gt, pred = pair(shape, seed)
    g, p = M.minmax(gt), M.minmax(pred)
    assert M.nrmse(gt, pred) == pytest.approx(
        normalized_root_mse(g, p, normalization="min-max"), rel=1e-12
    )
    assert M.psnr(gt, pred) == pytest.approx(peak_signal_noise_ratio(g, p, data_range=1), rel=1e-12)
    ref = np.corrcoef(gt.ravel().astype(np.float64), pred.ravel().astype(np.float64))[0, 1]
    assert M.pcc(gt, pred) == pytest.approx(ref, abs=1e-12)


def test_identical_and_constant_volumes():
    gt, _ = pair((12, 16, 16), 4)
    same = M.pixel_metrics(gt, gt)
    assert same["PCC"] == pytest.approx(1.0) and same["SSIM"] == pytest.approx(1.0)
    assert same["NRMSE"] == 0.0 and same["PSNR"] == math.inf
    flat = M.pixel_metrics(gt, np.full_like(gt, 3.0))  # a blank prediction: no crash
    assert math.isnan(flat["PCC"])
    assert np.isfinite([flat["SSIM"], flat["NRMSE"], flat["PSNR"]]).all()
    both = M.pixel_metrics(np.zeros((4, 8, 8)), np.zeros((4, 8, 8)))
    assert math.isnan(both["PCC"]) and both["NRMSE"] == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        M.pcc(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))


# --------------------------------------------------------------------------- masks


def test_mask_metrics_hand_built():
    gt = np.zeros((2, 4, 5), np.int32)
    pred = np.zeros_like(gt)
    gt[0, :2, :] = 3  # 10 voxels, instance label 3 (foreground = label > 0)
    pred[0, 1:3, :] = 1  # 10 voxels, 5 overlap
    m = M.mask_metrics(gt, pred)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (5, 5, 5, 25)
    assert m["Dice"] == pytest.approx(0.5) and m["IoU"] == pytest.approx(1 / 3)
    assert m["Precision"] == pytest.approx(0.5) and m["Recall"] == pytest.approx(0.5)
    assert m["Accuracy"] == pytest.approx(30 / 40)
    perfect = M.mask_metrics(gt, gt > 0)
    assert perfect["Dice"] == 1.0 and perfect["IoU"] == 1.0 and perfect["FP"] == 0


def test_mask_metrics_empty_masks_are_nan_not_errors():
    empty = np.zeros((2, 3, 3), np.int32)
    both = M.mask_metrics(empty, empty)
    assert math.isnan(both["Dice"]) and math.isnan(both["IoU"])
    assert math.isnan(both["Precision"]) and math.isnan(both["Recall"])
    assert both["Accuracy"] == 1.0 and both["TN"] == 18
    gt = empty.copy()
    gt[0, 0, 0] = 1
    missed = M.mask_metrics(gt, empty)
    assert missed["Dice"] == 0.0 and missed["Recall"] == 0.0 and math.isnan(missed["Precision"])


# --------------------------------------------------------------------------- features


def torch_fidelity_fid(a, b):
    import torch
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    s1 = fid_features_to_statistics(torch.from_numpy(np.asarray(a, np.float64)))
    s2 = fid_features_to_statistics(torch.from_numpy(np.asarray(b, np.float64)))
    return fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]


def test_fid_matches_torch_fidelity_and_analytic_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    assert M.fid(a, b) == pytest.approx(torch_fidelity_fid(a, b), rel=1e-10)
    assert M.fid(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert M.fid(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    # one feature column (np.cov gives a 0-d array there)
    assert M.fid(a[:, :1], a[:, :1] + 2.0) == pytest.approx(4.0, rel=1e-8)


def test_fid_fewer_than_two_cells_is_nan():
    a = np.random.default_rng(1).normal(size=(5, 3))
    assert math.isnan(M.fid(a[:1], a))
    assert math.isnan(M.fid(a, a[:0]))
    assert math.isnan(M.fid(a[:, :0], a[:, :0]))


def test_standardize_uses_gt_statistics_and_prunes_near_constant_columns():
    rng = np.random.default_rng(2)
    gt = np.column_stack(
        [rng.normal(5, 2, 50), np.full(50, 7.0), np.full(50, 1.0), rng.normal(0, 1e-3, 50)]
    )
    pred = np.column_stack(
        [rng.normal(6, 2, 40), rng.normal(7, 1, 40), np.full(40, 1.0), rng.normal(0.2, 0.1, 40)]
    )
    gz, pz, kept = M.standardize(gt, pred)
    # constant in both, constant in GT, and GT std << pooled std: all pruned
    assert kept.tolist() == [0]
    assert gz[:, 0].mean() == pytest.approx(0, abs=1e-12) and gz[:, 0].std() == pytest.approx(1)
    np.testing.assert_allclose(pz[:, 0], (pred[:, 0] - gt[:, 0].mean()) / gt[:, 0].std())
    # an ordinary shifted column is kept however large the shift
    shifted = np.column_stack([gt[:, 0], gt[:, 0] * 3])
    _, pz2, kept2 = M.standardize(shifted, shifted + 10.0)
    assert kept2.tolist() == [0, 1] and np.all(np.abs(pz2) < 100)


def test_median_cosine_similarity():
    gt = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    pred = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [1.0, 1.0]])
    assert M.median_cosine_similarity(gt, pred) == pytest.approx(
        0.0
    )  # cos 1, 0, -1; zero row skipped
    assert M.median_cosine_similarity(gt[:1], 3 * gt[:1]) == pytest.approx(1.0)
    assert math.isnan(M.median_cosine_similarity(gt[:0], pred[:0]))


def feature_frame(rng, fovs=("A/1/0", "A/1/1"), timepoints=2, n=12):
    rows = []
    for fov in fovs:
        for t in range(timepoints):
            for cid in range(1, n + 1):
                rows.append({"fov": fov, "t": t, "cell_id": cid, "condition": "mock"})
    df = pd.DataFrame(rows)
    for col in ("mean", "std", "p50", "kurtosis"):
        df[col] = rng.normal(size=len(df))
    df["volume"] = rng.integers(10, 100, len(df)).astype(float)
    return df


def test_feature_metrics_pairs_groups_and_dataset_fid():
    rng = np.random.default_rng(3)
    gt = feature_frame(rng)
    pred = gt.copy()
    cols = ["mean", "std", "p50", "kurtosis"]
    pred[cols] = gt[cols] + 0.1 * rng.normal(size=(len(gt), 4))
    shuffled = pred.sample(frac=1.0, random_state=0)  # pairing is by key, not by row order
    groups = [("A/1/0", 0), ("A/1/0", 1), ("A/1/1", 0), ("A/1/1", 1), ("A/1/2", 0)]
    out = M.feature_metrics(gt, shuffled, cols, groups=groups)
    assert list(out.columns) == [
        "fov",
        "t",
        "n_cells",
        "CP_FID",
        "CP_Median_Cosine_Similarity",
        "Dataset_CP_FID",
    ]
    assert out["n_cells"].tolist() == [12, 12, 12, 12, 0]
    assert out["CP_Median_Cosine_Similarity"].iloc[:4].gt(0.9).all()
    assert out["CP_FID"].iloc[:4].between(0, 5).all()
    assert math.isnan(out["CP_FID"].iloc[4]) and math.isnan(
        out["CP_Median_Cosine_Similarity"].iloc[4]
    )
    g = gt.sort_values(["fov", "t", "cell_id"])[cols].to_numpy()
    p = pred.sort_values(["fov", "t", "cell_id"])[cols].to_numpy()
    gz, pz, _ = M.standardize(g, p)
    assert out["Dataset_CP_FID"].nunique() == 1
    assert out["Dataset_CP_FID"].iloc[0] == pytest.approx(torch_fidelity_fid(gz, pz), rel=1e-9)
    sel = (gt.sort_values(["fov", "t", "cell_id"]).fov == "A/1/1").to_numpy() & (
        gt.sort_values(["fov", "t", "cell_id"]).t == 0
    ).to_numpy()
    assert out["CP_FID"].iloc[2] == pytest.approx(torch_fidelity_fid(gz[sel], pz[sel]), rel=1e-9)
    same = M.feature_metrics(gt, gt, cols)
    assert same["CP_FID"].abs().max() < 1e-6 and same["Dataset_CP_FID"].iloc[0] < 1e-6
    np.testing.assert_allclose(same["CP_Median_Cosine_Similarity"], 1.0, atol=1e-12)


def test_feature_metrics_without_cells():
    empty = feature_frame(np.random.default_rng(0)).iloc[:0]
    out = M.feature_metrics(empty, empty, ["mean"], groups=[("A/1/0", 0)])
    assert out["n_cells"].tolist() == [0] and out[["CP_FID", "Dataset_CP_FID"]].isna().all(
        axis=None
    )


# --------------------------------------------------------------------------- step script


def write_int_plate(path, fovs, channel):
    from vsbench import io

    with io.create_plate(path, [channel]) as plate:
        for fov, arr in fovs.items():
            io.write_fov(plate, fov, arr[:, None].astype(np.int32), (2.0, 0.325, 0.325))
    return path


def run_step(repo_root, tmp_path, inputs, fovs, channel="ER"):
    out = types.SimpleNamespace(
        pixel=str(tmp_path / "pixel.csv"),
        mask=str(tmp_path / "mask.csv"),
        feature=str(tmp_path / "feature.csv"),
    )
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(**{k: str(v) for k, v in inputs.items()}),
        output=out,
        params=types.SimpleNamespace(
            channel=channel, fovs=fovs, settings={"kid_subsets": 50}, seed=0
        ),
        log=[],
        threads=1,
        rule="metrics",
    )
    runpy.run_path(str(repo_root / "src/vsbench/steps/metrics.py"), init_globals={"snakemake": ns})
    return (pd.read_csv(out.pixel), pd.read_csv(out.mask), pd.read_csv(out.feature))


@pytest.fixture
def benchmark_cell(tmp_path, make_plate):
    """GT plate, prediction plate, GT/prediction masks and feature tables for two FOVs."""
    from vsbench import io
    from vsbench.features import cell_features

    rng = np.random.default_rng(5)
    shape = (2, 12, 24, 24)
    names = ["A/1/0", "A/2/0"]
    gt, pred, gtm, pm, cells = {}, {}, {}, {}, {}
    for k, fov in enumerate(names):
        g, p = pair(shape, k, noise=0.3)
        gt[fov] = np.stack([rng.normal(size=shape), g], axis=1)  # BF, ER
        pred[fov] = p[:, None]
        gtm[fov] = (g > np.percentile(g, 80)).astype(np.int32)
        pm[fov] = (p > np.percentile(p, 80)).astype(np.int32)
        lab = np.zeros(shape, np.int32)
        for c in range(6):
            lab[:, 2 * c : 2 * c + 2, 2:20, 3 * c : 3 * c + 3] = c + 1
        cells[fov] = lab
    gtm["A/2/0"][1] = 0  # the empty-masks corner: nothing segmented at FOV A/2/0, t=1
    pm["A/2/0"][1] = 0
    paths = {
        "gt_image": make_plate(tmp_path / "pre.zarr", gt, ["BF", "ER"]),
        "prediction": make_plate(tmp_path / "prediction.zarr", pred, ["er_prediction"]),
        "gt_masks": write_int_plate(tmp_path / "gt_masks.zarr", gtm, "mask"),
        "masks": write_int_plate(tmp_path / "masks.zarr", pm, "mask"),
    }
    for name, data, ch in (("gt_features", gt, 1), ("features", pred, 0)):
        frames = []
        for fov in names:
            for t in range(shape[0]):
                df = cell_features(M.minmax(data[fov][t, ch]), cells[fov][t])
                df.insert(0, "condition", "mock")
                df.insert(0, "t", t)
                df.insert(0, "fov", fov)
                frames.append(df)
        paths[name] = tmp_path / f"{name}.parquet"
        io.write_table(pd.concat(frames, ignore_index=True), paths[name])
    return paths, names, gt, pred, gtm, pm


def test_step_writes_three_tables(tmp_path, repo_root, benchmark_cell):
    paths, names, gt, pred, gtm, pm = benchmark_cell
    pixel, mask, feature = run_step(repo_root, tmp_path, paths, names)
    assert list(pixel.columns) == ["FOV", "Timepoint", "PCC", "SSIM", "NRMSE", "PSNR"]
    assert list(mask.columns) == [
        "FOV",
        "Timepoint",
        "Dice",
        "IoU",
        "Precision",
        "Recall",
        "Accuracy",
        "TP",
        "FP",
        "FN",
        "TN",
    ]
    assert list(feature.columns) == [
        "FOV",
        "Timepoint",
        "n_cells",
        "CP_FID",
        "CP_Median_Cosine_Similarity",
        "Dataset_CP_FID",
    ]
    expected = [(f, t) for f in names for t in range(2)]
    for table in (pixel, mask, feature):
        assert list(zip(table.FOV, table.Timepoint, strict=True)) == expected
    row = pixel.iloc[1]
    ref = M.pixel_metrics(gt["A/1/0"][1, 1], pred["A/1/0"][1, 0])
    assert row["SSIM"] == pytest.approx(ref["SSIM"]) and row["PCC"] == pytest.approx(ref["PCC"])
    assert mask.iloc[0]["TP"] == M.mask_metrics(gtm["A/1/0"][0], pm["A/1/0"][0])["TP"]
    assert math.isnan(mask.iloc[3]["Dice"]) and mask.iloc[3]["Accuracy"] == 1.0  # empty vs empty
    assert feature["n_cells"].tolist() == [6, 6, 6, 6]
    assert feature["Dataset_CP_FID"].nunique() == 1 and feature["Dataset_CP_FID"].iloc[0] > 0
    assert feature["CP_FID"].notna().all()


def test_step_perfect_prediction(tmp_path, repo_root, benchmark_cell):
    """The GT itself (rescaled) as prediction: PCC 1, SSIM 1, Dice 1, FID 0."""
    from vsbench import io

    paths, names, gt, _, gtm, _ = benchmark_cell
    with io.create_plate(tmp_path / "perfect.zarr", ["er_prediction"]) as plate:
        for fov in names:
            io.write_fov(plate, fov, 3 * gt[fov][:, 1:2] + 1, (2.0, 0.325, 0.325))
    paths = {
        **paths,
        "prediction": tmp_path / "perfect.zarr",
        "masks": paths["gt_masks"],
        "features": paths["gt_features"],
    }
    pixel, mask, feature = run_step(repo_root, tmp_path, paths, names)
    np.testing.assert_allclose(pixel["PCC"], 1.0, atol=1e-6)
    np.testing.assert_allclose(pixel["SSIM"], 1.0, atol=1e-6)
    assert mask["Dice"].iloc[:3].eq(1.0).all()
    assert feature["CP_FID"].abs().max() < 1e-6
    np.testing.assert_allclose(feature["CP_Median_Cosine_Similarity"], 1.0, atol=1e-12)


def test_step_input_errors(tmp_path, repo_root, benchmark_cell, make_plate):
    from vsbench.io import InputError

    paths, names, _, _, _, _ = benchmark_cell
    with pytest.raises(InputError, match="channel 'Mito' not found"):
        run_step(repo_root, tmp_path, paths, names, channel="Mito")
    small = make_plate(
        tmp_path / "small.zarr", {f: np.ones((2, 1, 12, 24, 20)) for f in names}, ["er_prediction"]
    )
    with pytest.raises(InputError, match="does not match"):
        run_step(repo_root, tmp_path, {**paths, "prediction": small}, names)


def test_step_blank_prediction_does_not_crash(tmp_path, repo_root, benchmark_cell):
    """A constant prediction with empty masks: NaN where undefined, numbers elsewhere."""
    from vsbench import io
    from vsbench.features import cell_features

    paths, names, _, _, gtm, _ = benchmark_cell
    with io.create_plate(tmp_path / "blank.zarr", ["er_prediction"]) as plate:
        for fov in names:
            io.write_fov(
                plate, fov, np.full((2, 1, 12, 24, 24), 7.0, np.float32), (2.0, 0.325, 0.325)
            )
    empty = write_int_plate(
        tmp_path / "empty.zarr", {f: np.zeros_like(gtm[f]) for f in names}, "mask"
    )
    gt_feats = io.read_table(paths["gt_features"])
    frames = []
    for (fov, t), rows in gt_feats.groupby(["fov", "t"]):
        labels = np.zeros((12, 24, 24), np.int32)  # same cell ids, constant image
        for cid in rows["cell_id"]:
            labels[2 * (cid - 1) : 2 * cid, 2:20, 3 * (cid - 1) : 3 * cid] = cid
        df = cell_features(np.zeros((12, 24, 24)), labels)
        df.insert(0, "condition", "mock")
        df.insert(0, "t", t)
        df.insert(0, "fov", fov)
        frames.append(df)
    io.write_table(pd.concat(frames, ignore_index=True), tmp_path / "blank.parquet")
    paths = {
        **paths,
        "prediction": tmp_path / "blank.zarr",
        "masks": empty,
        "features": tmp_path / "blank.parquet",
    }
    pixel, mask, feature = run_step(repo_root, tmp_path, paths, names)
    assert pixel["PCC"].isna().all() and pixel["SSIM"].notna().all()
    assert (mask["TP"] == 0).all() and mask["Precision"].isna().all()
    assert np.isfinite(feature["Dataset_CP_FID"]).all() and (feature["Dataset_CP_FID"] > 0).all()
