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


@pytest.mark.parametrize(("shape", "seed"), PAIRS)
@pytest.mark.parametrize("spacing", [(2.0, 0.325, 0.325), (0.25, 0.1, 0.1)])
def test_spectral_pcc_matches_cubic(shape, seed, spacing):
    from cubic.metrics import spectral_pcc

    gt, pred = pair(shape, seed, noise=1.0)
    ours = M.spectral_pcc(gt, pred, spacing)
    assert ours == pytest.approx(spectral_pcc(pred, gt, spacing=spacing), abs=1e-4)
    assert M.spectral_pcc(gt, gt, spacing) == pytest.approx(1.0, abs=1e-6)


def test_per_cell_pcc_matches_a_loop_and_fsc_is_cubics():
    from cubic.metrics import fsc_resolution

    gt, pred = pair((12, 32, 32), 5)
    cells = np.zeros(gt.shape, np.int32)
    cells[:, :16, :16], cells[:, 16:, :20], cells[0, 0, 30] = 1, 2, 3  # cell 3: one voxel
    got = M.pixel_metrics(gt, pred, cells=cells)
    per = [np.corrcoef(gt[cells == c], pred[cells == c])[0, 1] for c in (1, 2)]
    assert got["PerCell_PCC_mean"] == pytest.approx(np.mean(per), abs=1e-12)
    assert got["PerCell_PCC_median"] == pytest.approx(np.median(per), abs=1e-12)
    assert math.isnan(M.pixel_metrics(gt, pred, cells=np.zeros_like(cells))["PerCell_PCC_mean"])
    spacing = (2.0, 0.325, 0.325)
    full = M.pixel_metrics(gt, pred, spacing=spacing, cells=cells, fsc=True)
    assert list(full) == M.PIXEL_COLUMNS[2:]  # the CSV contract, in order
    ref = fsc_resolution(pred, spacing=list(spacing), resample_isotropic=True)
    assert full["XY_FSC_Resolution"] == pytest.approx(ref["xy"])
    assert full["Z_FSC_Resolution"] == pytest.approx(ref["z"])
    flat = M.fsc_resolution(np.ones((4, 16, 16)), spacing)
    assert all(math.isnan(v) for v in flat)


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
    assert list(out.columns) == ["fov", "t", *M.FEATURE_GROUP_COLUMNS, *M.FEATURE_DATASET_COLUMNS]
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


# --------------------------------------------------------------------------- instances


def two_objects():
    gt = np.zeros((2, 10, 10), np.int32)
    gt[:, :4, :4] = 7  # 32 voxels, labels need not be consecutive
    gt[:, 6:, 6:] = 3  # 32 voxels
    pred = np.zeros_like(gt)
    pred[:, :4, :4] = 1  # exact copy of object 7
    pred[:, 6:, 7:] = 2  # object 3 shifted by one column: IoU 24 / 32 = 0.75
    return gt, pred


def test_instance_iou_matches_skimage_contingency_table():
    from skimage.metrics import contingency_table

    gt, pred = two_objects()
    pred[0, 0, 9] = 5  # a one-voxel false positive
    iou = M.instance_iou(gt, pred)
    table = contingency_table(gt, pred).toarray()
    inter = table[np.ix_([3, 7], [1, 2, 5])]
    sizes_g = np.array([(gt == 3).sum(), (gt == 7).sum()])
    sizes_p = np.array([(pred == k).sum() for k in (1, 2, 5)])
    np.testing.assert_allclose(iou, inter / (sizes_g[:, None] + sizes_p[None] - inter))
    assert iou[0, 1] == pytest.approx(0.75) and iou[1, 0] == 1.0


def test_instance_metrics_shifted_object():
    gt, pred = two_objects()
    m = M.instance_metrics(gt, pred)
    assert list(m) == M.INSTANCE_COLUMNS
    assert (m["n_gt"], m["n_pred"]) == (2, 2)
    for th in M.AP_THRESHOLDS:  # IoU 1.0 and 0.75: both match up to 0.75, one above
        assert m[f"AP_{th:.2f}"] == pytest.approx(1.0 if th <= 0.75 else 1 / 3)
    assert m["mAP"] == pytest.approx((6 + 4 / 3) / 10)
    assert m["SQ"] == pytest.approx(0.875) and m["RQ"] == 1.0 and m["PQ"] == pytest.approx(0.875)


def test_instance_metrics_false_positive_miss_and_split():
    gt, pred = two_objects()
    pred[pred == 2] = 0  # object 3 missed
    pred[:, 8:, :2] = 4  # a false positive
    pred[:, 5, 5] = 6  # and another
    m = M.instance_metrics(gt, pred)
    assert (m["n_gt"], m["n_pred"]) == (2, 3)
    assert m["AP_0.50"] == pytest.approx(1 / 4)  # TP 1, FP 2, FN 1
    assert m["RQ"] == pytest.approx(1 / (1 + 1 + 0.5)) and m["SQ"] == 1.0
    assert m["PQ"] == pytest.approx(m["SQ"] * m["RQ"])
    # one GT object split in two halves: IoU 0.5 each, only one may match
    gt1 = np.zeros((1, 4, 8), np.int32)
    gt1[0, :, :] = 1
    halves = np.zeros_like(gt1)
    halves[0, :, :4] = 1
    halves[0, :, 4:] = 2
    s = M.instance_metrics(gt1, halves)
    assert s["AP_0.50"] == pytest.approx(0.5) and s["AP_0.55"] == 0.0
    assert s["PQ"] == pytest.approx(0.5 * (1 / 1.5))


def test_instance_metrics_single_object_path_agrees_with_assignment():
    gt, pred = two_objects()
    binary_gt, binary_pred = (gt > 0).astype(np.int32), (pred == 2).astype(np.int32)
    iou = M.instance_iou(binary_gt, binary_pred)
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(M.mask_metrics(binary_gt, binary_pred)["IoU"])
    for th in (0.3, 0.375, 0.5):  # IoU 24 / 64 = 0.375
        assert len(M.match_instances(iou, th)[0]) == int(th <= 0.375)
    two = M.instance_iou(gt, pred == 2)  # two GT objects vs one prediction: (2, 1)
    gi, pi = M.match_instances(two, 0.5)
    assert gi.tolist() == [0] and pi.tolist() == [0]  # object 3 (sorted first), IoU 0.75


def test_instance_metrics_match_cubic_average_precision():
    """Parity with cubic.metrics.average_precision (the cellpose/stardist matching)."""
    from cubic.metrics.average_precision import average_precision
    from scipy import ndimage as ndi
    from skimage.measure import label

    rng = np.random.default_rng(13)
    blobs = ndi.gaussian_filter(rng.random((6, 64, 64)), (1, 3, 3))
    gt = label(blobs > np.percentile(blobs, 75))
    moved = np.roll(ndi.gaussian_filter(blobs + 0.02 * rng.random(blobs.shape), 1), 1, axis=2)
    pred = label(moved > np.percentile(moved, 78))
    assert gt.max() > 5 and pred.max() > 5
    ours = M.instance_metrics(gt, pred)
    ap, tp, fp, fn, iou = average_precision(gt, pred, list(M.AP_THRESHOLDS), return_iou=True)
    np.testing.assert_allclose(M.instance_iou(gt, pred), iou, atol=1e-12)
    np.testing.assert_allclose([ours[f"AP_{th:.2f}"] for th in M.AP_THRESHOLDS], ap, atol=1e-12)
    assert (ours["n_gt"], ours["n_pred"]) == (gt.max(), pred.max())
    assert 0 < ours["mAP"] < 1 and ours["mAP"] == pytest.approx(ap.mean())
    # PQ from cubic's IoU 0.5 matches: RQ = TP / (TP + FP/2 + FN/2)
    assert ours["RQ"] == pytest.approx(tp[0] / (tp[0] + fp[0] / 2 + fn[0] / 2))


def test_instance_metrics_empty_sides():
    gt, pred = two_objects()
    empty = np.zeros_like(gt)
    for a, b in ((gt, empty), (empty, pred)):
        m = M.instance_metrics(a, b)
        assert m["mAP"] == 0.0 and m["PQ"] == 0.0 and m["RQ"] == 0.0 and math.isnan(m["SQ"])
        assert all(m[f"AP_{th:.2f}"] == 0.0 for th in M.AP_THRESHOLDS)
    both = M.instance_metrics(empty, empty)
    assert (both["n_gt"], both["n_pred"]) == (0, 0)
    assert all(math.isnan(both[k]) for k in M.INSTANCE_COLUMNS[2:])
    full = np.ones((2, 3, 3), np.int32)  # no background at all: one object each
    assert M.instance_metrics(full, full)["mAP"] == 1.0


# --------------------------------------------------------------------------- KID, PRC, MIND


def test_kid_matches_torch_fidelity_and_unbiased_mmd():
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    a = rng.normal(size=(80, 5))
    b = rng.normal(size=(60, 5)) * 1.3 + 0.4
    mean, std = M.kid(a, b, subsets=20, seed=3, max_subset=40)
    ref = kid_features_to_metric(
        torch.from_numpy(a),
        torch.from_numpy(b),
        kid_subsets=20,
        kid_subset_size=40,
        rng_seed=3,
        verbose=False,
    )
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-12)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-12)
    # n <= 1000: each subset is all rows, KID = the full-sample unbiased MMD² (poly kernel)
    x, y = a[:50], b[:50]
    mean, std = M.kid(x, y, subsets=5, seed=0)

    def k(u, v):
        return (u @ v.T / u.shape[1] + 1) ** 3

    m = len(x)
    kxx, kyy = k(x, x), k(y, y)
    mmd = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    mmd -= 2 * k(x, y).mean()
    assert mean == pytest.approx(mmd, rel=1e-10) and std < 1e-12
    # two halves of one distribution vs two distributions
    assert abs(M.kid(a[:40], a[40:], subsets=5)[0]) < 0.2 * M.kid(a[:40], b[:40], subsets=5)[0]
    assert all(math.isnan(v) for v in M.kid(a[:1], b))


def test_precision_recall_matches_torch_fidelity():
    import torch
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(7)
    gt = rng.normal(size=(70, 4))
    pred = rng.normal(size=(70, 4)) * 0.5 + 0.8
    out = M.precision_recall(gt, pred, k=5)
    ref = prc_features_to_metric(
        torch.from_numpy(pred), torch.from_numpy(gt), prc_neighborhood=5, verbose=False
    )
    assert out["Precision"] == pytest.approx(ref["precision"], abs=1e-12)
    assert out["Recall"] == pytest.approx(ref["recall"], abs=1e-12)
    assert out["F1"] == pytest.approx(ref["f_score"], abs=1e-12)
    assert out["Recall"] < out["Precision"]  # a narrower prediction covers less of the GT
    assert out["Precision_std"] == 0.0  # no bootstrap: one evaluation
    same = M.precision_recall(gt, gt)
    assert (same["Precision"], same["Recall"]) == (1.0, 1.0) and same["F1"] == pytest.approx(1.0)
    far = M.precision_recall(gt, gt + 100.0)
    assert far["Precision"] == 0.0 and far["Recall"] == 0.0
    assert all(math.isnan(v) for v in M.precision_recall(gt[:5], pred).values())  # < k + 1
    # bootstrap: the mean and std over seeded 80 % subsamples, each a torch-fidelity call
    boot = M.precision_recall(gt, pred, k=5, n_boot=4, seed=3)
    rng = np.random.default_rng([3, 5])
    manual = []
    for _ in range(4):
        g = gt[rng.choice(70, 56, replace=False)]
        p = pred[rng.choice(70, 56, replace=False)]
        manual.append(prc_features_to_metric(torch.from_numpy(p), torch.from_numpy(g),
                                             prc_neighborhood=5, verbose=False)["precision"])  # fmt: skip
    assert boot["Precision"] == pytest.approx(np.mean(manual), abs=1e-12)
    assert (
        boot["Precision_std"] == pytest.approx(np.std(manual), abs=1e-12)
        and boot["Precision_std"] > 0
    )
    assert boot == M.precision_recall(gt, pred, k=5, n_boot=4, seed=3)  # seeded


def test_condition_probe_sees_the_phenotype_and_not_the_fov():
    rng = np.random.default_rng(11)
    fovs = np.repeat([f"F{k}" for k in range(6)], 30)
    cond = np.where(np.isin(fovs, ["F0", "F1", "F2"]), "mock", "denv")
    pheno = rng.normal(size=(180, 3))
    pheno[:, 0] += 2.0 * (cond == "denv")  # a swollen-ER-like shift
    assert M.condition_probe(pheno, cond, fovs) > 0.8  # Bayes AUROC for a 2-sd shift: 0.92
    erased = pheno.copy()
    erased[:, 0] = rng.normal(size=180)  # a prediction that lost the phenotype
    assert abs(M.condition_probe(erased, cond, fovs) - 0.5) < 0.15
    # a feature that names the FOV but not the condition must not help (folds are FOVs)
    fov_code = np.column_stack([rng.normal(size=180), (fovs == "F0") * 5.0 + (fovs == "F4") * 5.0])
    assert M.condition_probe(fov_code, cond, fovs) < 0.75
    assert math.isnan(M.condition_probe(pheno, np.full(180, "mock"), fovs))
    assert math.isnan(M.condition_probe(pheno, cond, np.full(180, "F0")))


def test_mind_sliced_wasserstein():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(8)
    u, v = rng.normal(size=23), rng.gamma(2.0, size=41)
    assert M.wasserstein_1d(u, v) == pytest.approx(wasserstein_distance(u, v), rel=1e-12)
    a = rng.normal(size=(40, 6))
    assert M.mind(a, a) == pytest.approx(0.0, abs=1e-12)
    assert M.mind(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)  # a set, not pairs
    x = rng.normal(size=(30, 1))
    assert M.mind(x, x + 2.5) == pytest.approx(2.5)  # 1-D: a shift by c costs c
    y = rng.exponential(size=(17, 1))
    assert M.mind(x, y) == pytest.approx(wasserstein_distance(x[:, 0], y[:, 0]))
    # equal sizes (sorted gaps) and unequal sizes (scipy) are the same definition
    b = rng.normal(size=(40, 6)) + 0.5
    assert M.mind(a, b) == pytest.approx(M.mind(a, np.concatenate([b, b])), rel=1e-10)
    assert M.mind(a, b, seed=1) != M.mind(a, b, seed=2) and M.mind(a, b) == M.mind(a, b)
    assert math.isnan(M.mind(a[:1], b))


# --------------------------------------------------------------------------- probe


def probe_data(rng, n_fov=6, n=20, d=4, shift=0.0):
    gt = rng.normal(size=(n_fov * n, d))
    pred = gt + 0.3 * rng.normal(size=gt.shape)
    pred[:, 0] += shift
    fovs = np.repeat([f"A/1/{k}" for k in range(n_fov)], n)
    return gt, pred, fovs


def test_probe_pieces_match_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(12)
    x = rng.normal(size=(90, 5))
    y = (x[:, 0] + 0.8 * rng.normal(size=90) > 0).astype(float)
    w, b = M.logistic_fit(x, y)
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_[0], atol=1e-6)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-6)
    score = np.round(x @ w + b, 1)  # rounded: ties
    assert M.auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert math.isnan(M.auroc(np.ones(4), np.arange(4.0)))
    groups = np.repeat(["a", "b", "c", "d", "e"], [30, 20, 20, 10, 10])
    ours = sorted(tuple(test) for _, test in M.group_folds(groups, 3))
    theirs = sorted(tuple(test) for _, test in GroupKFold(3).split(x, y, groups))
    assert ours == theirs


def test_probe_fold_auroc_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    gt, pred, fovs = probe_data(np.random.default_rng(9), shift=0.4)
    out = M.real_vs_pred_probe(gt, pred, fovs, fovs, n_splits=3)
    assert len(out["folds"]) == 3
    x = np.concatenate([gt, pred])
    y = np.r_[np.zeros(len(gt)), np.ones(len(pred))]
    groups = np.r_[fovs, fovs]
    for k, (train, test) in enumerate(M.group_folds(groups, 3)):
        assert set(groups[train]).isdisjoint(groups[test])
        med = np.median(x[train], axis=0)
        mad = np.median(np.abs(x[train] - med), axis=0)
        model = LogisticRegression(tol=1e-12, max_iter=10_000).fit((x[train] - med) / mad, y[train])
        ref = roc_auc_score(y[test], model.predict_proba((x[test] - med) / mad)[:, 1])
        assert out["folds"][k] == pytest.approx(ref, abs=1e-9)
    assert out["AUROC"] == pytest.approx(np.mean(out["folds"]))
    assert out["AUROC_std"] == pytest.approx(np.std(out["folds"]))
    assert out["Indistinguishability"] == pytest.approx(1 - 2 * abs(out["AUROC"] - 0.5))


def test_probe_identical_separable_and_too_few_fovs():
    gt, pred, fovs = probe_data(np.random.default_rng(10))
    same = M.real_vs_pred_probe(gt, gt, fovs, fovs)
    assert same["AUROC"] == pytest.approx(0.5) and same["Indistinguishability"] == pytest.approx(1)
    sep = M.real_vs_pred_probe(gt, pred + np.r_[8.0, 0, 0, 0], fovs, fovs)
    assert sep["AUROC"] > 0.99 and sep["Indistinguishability"] < 0.02
    one = M.real_vs_pred_probe(gt, pred, ["A/1/0"] * len(gt), ["A/1/0"] * len(gt))
    assert math.isnan(one["AUROC"]) and one["folds"] == []


def test_probe_leakage_fov_identity_does_not_inflate_auroc():
    """Each FOV has its own GT→prediction offset and a column naming the FOV.

    A cell-level split would learn every FOV's offset and score near 1; split
    by FOV the offset of a held-out FOV is unseen and the probe stays at chance.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(11)
    n_fov, n, d = 20, 15, 30
    fov_id = np.repeat(np.arange(n_fov), n)
    offsets = rng.normal(scale=2.0, size=(n_fov, d))
    gt = 0.3 * rng.normal(size=(n_fov * n, d))
    pred = gt + offsets[fov_id]
    gt = np.column_stack([gt, fov_id])  # the FOV-identifying feature
    pred = np.column_stack([pred, fov_id])
    fovs = [f"B/2/{k}" for k in fov_id]
    out = M.real_vs_pred_probe(gt, pred, fovs, fovs)
    x = np.concatenate([gt, pred])
    y = np.r_[np.zeros(len(gt)), np.ones(len(pred))]
    leaky = []
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
        leaky.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    assert np.mean(leaky) > 0.95  # the data do leak under a cell-level split
    # by FOV the held-out offsets are unseen: chance level (each fold is a coin flip per
    # FOV, so the mean scatters around 0.5 by ~0.1 with the seed)
    assert out["AUROC"] < 0.75 and np.mean(leaky) - out["AUROC"] > 0.3


# --------------------------------------------------------------------------- step script


def write_int_plate(path, fovs, channel):
    from vsbench import io

    with io.create_plate(path, [channel]) as plate:
        for fov, arr in fovs.items():
            io.write_fov(plate, fov, arr[:, None].astype(np.int32), (2.0, 0.325, 0.325))
    return path


def run_step(repo_root, tmp_path, inputs, fovs, channel="ER", threads=1, **params):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = types.SimpleNamespace(
        pixel=str(tmp_path / "pixel.csv"),
        mask=str(tmp_path / "mask.csv"),
        feature=str(tmp_path / "feature.csv"),
        timing=str(tmp_path / "eval_timing.csv"),
    )
    ns = types.SimpleNamespace(
        input=types.SimpleNamespace(**{k: str(v) for k, v in inputs.items()}),
        output=out,
        params=types.SimpleNamespace(
            channel=channel, fovs=fovs, settings={"kid_subsets": 50}, seed=0, **params
        ),
        log=[],
        threads=threads,
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
        "cells": write_int_plate(tmp_path / "cells.zarr", cells, "cells"),
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
        emb = pd.concat(frames, ignore_index=True)[["fov", "t", "cell_id", "condition"]].copy()
        for k in range(4):
            emb[f"e{k}"] = rng.normal(size=len(emb))
        key = "gt_embeddings" if name == "gt_features" else "embeddings"
        paths[key] = tmp_path / f"{key}.parquet"
        io.write_table(emb, paths[key])
    return paths, names, gt, pred, gtm, pm


def test_step_writes_three_tables(tmp_path, repo_root, benchmark_cell):
    paths, names, gt, pred, gtm, pm = benchmark_cell
    pixel, mask, feature = run_step(repo_root, tmp_path, paths, names)
    assert list(pixel.columns) == M.PIXEL_COLUMNS
    assert pixel[["Spectral_PCC", "PerCell_PCC_mean", "PerCell_PCC_median"]].notna().all().all()
    assert (pixel.XY_FSC_Resolution > 0).all() or pixel.XY_FSC_Resolution.isna().all()
    timing = pd.read_csv(tmp_path / "eval_timing.csv")
    assert list(timing.columns) == ["FOV", "Timepoint", "region", "seconds"]
    assert {"read", "pixel", "fsc", "mask", "features"} <= set(timing.region)
    assert (timing.seconds >= 0).all()
    # binary 0/1 masks: no instance columns
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
        *("n_cells", "CP_FID", "CP_KID", "CP_KID_std", "CP_Median_Cosine_Similarity"),
        *("Dataset_CP_FID", "Dataset_CP_KID", "Dataset_CP_KID_std", "Dataset_CP_Precision"),
        *("Dataset_CP_Precision_std", "Dataset_CP_Recall", "Dataset_CP_Recall_std"),
        *("Dataset_CP_F1", "Dataset_CP_F1_std", "Dataset_CP_MIND"),
        *("Dataset_CP_Median_Cosine_Similarity", "Dataset_CP_RealVsPred_AUROC"),
        *("Dataset_CP_RealVsPred_AUROC_std", "Dataset_CP_Indistinguishability"),
        *("Dataset_CP_Condition_AUROC_GT", "Dataset_CP_Condition_AUROC_Pred"),
        *M.feature_group_columns("Encoder")[1:],  # the embeddings: the same metrics
        *M.feature_dataset_columns("Encoder"),
    ]
    assert feature["Encoder_FID"].notna().all() and feature["Dataset_Encoder_FID"].nunique() == 1
    expected = [(f, t) for f in names for t in range(2)]
    for table in (pixel, mask, feature):
        assert list(zip(table.FOV, table.Timepoint, strict=True)) == expected
    row = pixel.iloc[1]
    ref = M.pixel_metrics(gt["A/1/0"][1, 1], pred["A/1/0"][1, 0], (2.0, 0.325, 0.325))
    assert row["SSIM"] == pytest.approx(ref["SSIM"]) and row["PCC"] == pytest.approx(ref["PCC"])
    assert row["Spectral_PCC"] == pytest.approx(ref["Spectral_PCC"])
    assert mask.iloc[0]["TP"] == M.mask_metrics(gtm["A/1/0"][0], pm["A/1/0"][0])["TP"]
    assert math.isnan(mask.iloc[3]["Dice"]) and mask.iloc[3]["Accuracy"] == 1.0  # empty vs empty
    assert feature["n_cells"].tolist() == [6, 6, 6, 6]
    assert feature["Dataset_CP_FID"].nunique() == 1 and feature["Dataset_CP_FID"].iloc[0] > 0
    assert feature["CP_FID"].notna().all()


def test_step_fov_parallelism_changes_nothing(tmp_path, repo_root, benchmark_cell, restore_threads):
    paths, names, *_ = benchmark_cell
    one = run_step(repo_root, tmp_path / "one", paths, names, threads=1)
    two = run_step(repo_root, tmp_path / "two", paths, names, threads=2)  # 2 FOVs at a time
    for a, b in zip(one, two, strict=True):
        pd.testing.assert_frame_equal(a, b, rtol=1e-9)


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


def test_step_instance_targets_get_instance_columns(tmp_path, repo_root, benchmark_cell):
    """Label masks (labels > 1) add n_gt ... RQ to mask.csv; a binary method never does."""
    paths, names, *_ = benchmark_cell
    gtm, pm = {}, {}
    for k, fov in enumerate(names):
        lab = np.zeros((2, 12, 24, 24), np.int32)
        for c in range(4):
            lab[:, 3 * c : 3 * c + 2, 2:20, 5 * c : 5 * c + 4] = c + 1
        gtm[fov] = lab
        pm[fov] = np.roll(lab * (lab != 4), k, axis=3)  # FOV 2: shifted; object 4 missed
    paths = {
        **paths,
        "gt_masks": write_int_plate(tmp_path / "gt_labels.zarr", gtm, "mask"),
        "masks": write_int_plate(tmp_path / "labels.zarr", pm, "mask"),
    }
    _, mask, feature = run_step(repo_root, tmp_path, paths, names)
    assert list(mask.columns) == M.MASK_COLUMNS + M.INSTANCE_COLUMNS
    for i, (fov, t) in enumerate((f, t) for f in names for t in range(2)):
        ref = M.instance_metrics(gtm[fov][t], pm[fov][t])
        for col in M.INSTANCE_COLUMNS:
            assert mask.iloc[i][col] == pytest.approx(ref[col], nan_ok=True)
    assert mask["n_gt"].eq(4).all() and mask["n_pred"].eq(3).all()
    assert mask["AP_0.50"].iloc[0] == pytest.approx(3 / 4)  # 3 exact matches, 1 miss
    assert mask["SQ"].iloc[0] == 1.0 and mask["SQ"].iloc[2] < 1.0
    assert feature["Dataset_CP_RealVsPred_AUROC"].notna().all()  # two FOVs: the probe runs
    _, binary, _ = run_step(repo_root, tmp_path, paths, names, segmentation_method="ridge")
    assert list(binary.columns) == M.MASK_COLUMNS
