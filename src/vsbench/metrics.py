"""Pixel, mask and feature metrics between a ground truth and a prediction.

Definitions (the reference implementation each is parity-tested against):
- `minmax`: (x - min) / (max - min); a constant volume maps to all zeros.
- PCC: Pearson correlation of the raw voxels (numpy.corrcoef); NaN when
  either volume is constant (the correlation is undefined).
- SSIM: 3D, Gaussian window σ 1.5 truncated at 3.5σ (11 taps), K1 0.01,
  K2 0.03, population covariance, on each volume min–max scaled to [0, 1],
  data range 1; the mean is taken after cropping the 5-voxel window radius
  from every border (skimage.metrics.structural_similarity with
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1). Axes shorter than the window are cropped by at most
  (n - 1) // 2 so thin stacks still get a value (skimage refuses them).
- NRMSE: sqrt(mean((gt' - pred')²)) / (max(gt') - min(gt')) with gt', pred'
  the min–max scaled volumes, i.e. the RMSE on the [0, 1] scale
  (skimage.metrics.normalized_root_mse(gt', pred', normalization="min-max")).
  For a constant GT (range 0 after scaling) it is the plain RMSE.
- PSNR: 10·log10(1 / MSE) on the min–max scaled pair
  (skimage.metrics.peak_signal_noise_ratio(gt', pred', data_range=1));
  +inf for identical volumes.
- masks: foreground = label > 0. Dice = 2TP/(2TP+FP+FN), IoU = TP/(TP+FP+FN),
  precision = TP/(TP+FP), recall = TP/(TP+FN), accuracy = (TP+TN)/N. A ratio
  whose denominator is 0 is NaN (e.g. Dice and IoU when both masks are
  empty: there is no foreground to agree on, and NaN keeps such frames out
  of nan-aware means instead of rewarding them with 1.0).
- FID: Fréchet distance between Gaussians fitted to two feature matrices,
  torch-fidelity's fid_features_to_statistics / fid_statistics_to_metric;
  NaN when either side has fewer than two rows or no usable column.
  Tiny negative values from round-off are clipped to 0.
- median cosine similarity: over paired rows (same cell), NaN pairs (a zero
  vector) skipped; NaN when no pair is left.
- instances (label images, 0 = background): IoU of every GT/prediction object
  pair; at each threshold th in 0.50, 0.55, ..., 0.95 objects are matched
  one-to-one by a linear assignment that maximises the number of pairs with
  IoU >= th (cellpose's `metrics.average_precision` / stardist's `matching`);
  AP_th = TP / (TP + FP + FN) (the cellpose/stardist "AP", i.e. a
  critical-success index, not the area under a precision-recall curve);
  mAP = mean of AP_0.50 ... AP_0.95. PQ, SQ, RQ at IoU 0.5 (Kirillov et al.):
  SQ = mean IoU of the matched pairs, RQ = TP / (TP + FP/2 + FN/2), PQ = SQ·RQ.
  No object on either side → every ratio NaN (as for Dice); objects on one
  side only → AP, mAP, RQ, PQ 0 and SQ NaN (no matched pair to average).
- KID: torch-fidelity's kid_features_to_metric, polynomial kernel
  (x·y/d + 1)³, unbiased MMD², `subsets` random subsets of size
  min(1000, n_gt, n_pred) drawn with a fixed seed; mean and std over subsets.
  When n <= 1000 every subset holds all rows (in another order), so the std is
  0 and the mean is the full-sample unbiased MMD². NaN below two rows.
- precision / recall / F1: torch-fidelity's prc_features_to_metric with k = 5
  (prediction = "generated", GT = "real"): precision = share of prediction
  rows inside some GT row's k-NN ball, recall = share of GT rows inside some
  prediction row's ball; F1 their harmonic mean. NaN below k + 1 rows per side.
- MIND: sliced Wasserstein-1 distance, the mean over P = 128 random unit
  directions (seeded, isotropic Gaussian draws normalised) of the 1-D
  Wasserstein-1 distance between the projected GT and prediction rows
  (∫|F_gt − F_pred|, as scipy.stats.wasserstein_distance; for equal row
  counts the mean absolute gap of the sorted projections). In standardized
  feature units; 0 for identical sets; NaN below two rows per side.
- GT-vs-prediction probe: rows labelled GT (0) / prediction (1), folds by FOV
  (min(5, n_FOV) folds, sklearn GroupKFold's assignment; paired cells share a
  FOV so a cell and its prediction never straddle train and test); in each
  fold a median/MAD scaler (MAD 0 → 1) and an L2 logistic regression (C = 1,
  sklearn LogisticRegression's objective, solved by Newton's method) are fitted
  on the training rows only; AUROC (rank-sum formula, = sklearn roc_auc_score)
  on the held-out rows; mean and std over folds; Indistinguishability =
  1 − 2|AUROC − 0.5| (1: the probe cannot tell them apart). NaN with fewer
  than two FOVs. sklearn itself is only used by the parity tests: importing it
  (and scipy.stats) costs ~1 s per metrics job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

# CSV contracts of the metrics rule: pixel.csv and mask.csv, one row per (FOV, t)
PIXEL_COLUMNS = ["FOV", "Timepoint", "PCC", "SSIM", "NRMSE", "PSNR"]
MASK_COLUMNS = [
    "FOV",
    "Timepoint",
    *("Dice", "IoU", "Precision", "Recall", "Accuracy"),
    *("TP", "FP", "FN", "TN"),
]

if TYPE_CHECKING:
    import pandas as pd

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------- pixel


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the volume's own min and max (float64); constant → zeros."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ground truth {a.shape} vs prediction {b.shape}")
    if a.size == 0:
        raise ValueError("empty volume")


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation coefficient; NaN if either volume is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    _check_pair(a, b)
    da = a - a.mean()
    db = b - b.mean()
    denom = np.sqrt(np.dot(da, da) * np.dot(db, db))
    if denom == 0 or not np.isfinite(denom):
        return float("nan")
    return float(np.clip(np.dot(da, db) / denom, -1.0, 1.0))


def ssim3d(a: np.ndarray, b: np.ndarray) -> float:
    """Mean 3D SSIM of the min–max scaled pair (Gaussian window, see module doc)."""
    from scipy import ndimage as ndi

    a = minmax(a)
    b = minmax(b)
    _check_pair(a, b)
    args = {"sigma": SSIM_SIGMA, "truncate": SSIM_TRUNCATE, "mode": "reflect"}
    ux = ndi.gaussian_filter(a, **args)
    uy = ndi.gaussian_filter(b, **args)
    vx = ndi.gaussian_filter(a * a, **args) - ux * ux
    vy = ndi.gaussian_filter(b * b, **args) - uy * uy
    vxy = ndi.gaussian_filter(a * b, **args) - ux * uy
    c1 = SSIM_K1**2
    c2 = SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    crop = tuple(slice(p, n - p) for n in s.shape for p in [min(radius, (n - 1) // 2)])
    return float(s[crop].mean(dtype=np.float64))


def nrmse(a: np.ndarray, b: np.ndarray) -> float:
    """RMSE of the min–max scaled pair divided by the scaled GT's range (see module doc)."""
    a = minmax(a)
    b = minmax(b)
    _check_pair(a, b)
    rmse = float(np.sqrt(np.mean((a - b) ** 2)))
    span = float(a.max() - a.min())
    return rmse / span if span > 0 else rmse


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of the min–max scaled pair with data range 1; +inf when identical."""
    a = minmax(a)
    b = minmax(b)
    _check_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(1.0 / mse))


def pixel_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """PCC, SSIM, NRMSE, PSNR of one (Z, Y, X) pair."""
    return {
        "PCC": pcc(gt, pred),
        "SSIM": ssim3d(gt, pred),
        "NRMSE": nrmse(gt, pred),
        "PSNR": psnr(gt, pred),
    }


# --------------------------------------------------------------------------- masks


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def mask_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Binary overlap metrics with foreground = label > 0 (see module doc for 0/0)."""
    g = np.asarray(gt) > 0
    p = np.asarray(pred) > 0
    _check_pair(g, p)
    tp = int(np.count_nonzero(g & p))
    fp = int(np.count_nonzero(~g & p))
    fn = int(np.count_nonzero(g & ~p))
    tn = int(g.size - tp - fp - fn)
    return {
        "Dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "IoU": _ratio(tp, tp + fp + fn),
        "Precision": _ratio(tp, tp + fp),
        "Recall": _ratio(tp, tp + fn),
        "Accuracy": _ratio(tp + tn, g.size),
        "TP": tp,
        "FP": fp,
        "FN": fn,
        "TN": tn,
    }


# --------------------------------------------------------------------------- features


def standardize(
    gt: np.ndarray, pred: np.ndarray, eps: float = 1e-12, near_constant: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale both matrices by the GT's column mean/std; returns (gt_z, pred_z, kept columns).

    The GT statistics define the space so that every prediction of a benchmark
    is measured in the same units. Columns near-constant in the GT are pruned:
    GT std below `near_constant` x the pooled (GT + prediction) std, or zero.
    Such a column (e.g. the per-cell minimum of a p1-clipped image, ~always 0)
    would turn any variation of the prediction into z-scores of hundreds and
    one dimension would dominate a Fréchet distance. Non-finite columns are dropped.
    """
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim != 2 or pred.ndim != 2 or gt.shape[1] != pred.shape[1]:
        raise ValueError(f"feature matrices must be (n, d) with equal d: {gt.shape}, {pred.shape}")
    finite = np.isfinite(gt).all(axis=0) & np.isfinite(pred).all(axis=0)
    if gt.shape[0] == 0:
        return gt[:, finite], pred[:, finite], np.flatnonzero(finite)
    mean = gt.mean(axis=0)
    std = gt.std(axis=0)
    both = np.concatenate([gt, pred]) if pred.shape[0] else gt
    pooled = both.std(axis=0)
    keep = finite & (std > eps) & (std >= near_constant * pooled)
    idx = np.flatnonzero(keep)
    return (gt[:, idx] - mean[idx]) / std[idx], (pred[:, idx] - mean[idx]) / std[idx], idx


def fid(gt: np.ndarray, pred: np.ndarray) -> float:
    """Fréchet distance of two (n, d) feature matrices via torch-fidelity (see module doc)."""
    import torch
    from torch_fidelity.metric_fid import (
        KEY_METRIC_FID,
        fid_features_to_statistics,
        fid_statistics_to_metric,
    )

    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim != 2 or pred.ndim != 2 or gt.shape[1] != pred.shape[1]:
        raise ValueError(f"feature matrices must be (n, d) with equal d: {gt.shape}, {pred.shape}")
    if gt.shape[0] < 2 or pred.shape[0] < 2 or gt.shape[1] == 0:
        return float("nan")
    if not (np.isfinite(gt).all() and np.isfinite(pred).all()):
        return float("nan")

    def stats(x: np.ndarray) -> dict:
        s = fid_features_to_statistics(torch.from_numpy(x))
        s["sigma"] = np.atleast_2d(s["sigma"])  # np.cov of one column is 0-d
        return s

    value = fid_statistics_to_metric(stats(gt), stats(pred), verbose=False)[KEY_METRIC_FID]
    return max(float(value), 0.0)


def _check_features(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim != 2 or pred.ndim != 2 or gt.shape[1] != pred.shape[1]:
        raise ValueError(f"feature matrices must be (n, d) with equal d: {gt.shape}, {pred.shape}")
    return gt, pred


def _usable(gt: np.ndarray, pred: np.ndarray, min_rows: int) -> bool:
    return (
        gt.shape[0] >= min_rows
        and pred.shape[0] >= min_rows
        and gt.shape[1] > 0
        and bool(np.isfinite(gt).all() and np.isfinite(pred).all())
    )


def kid(
    gt: np.ndarray, pred: np.ndarray, subsets: int = 50, seed: int = 0, max_subset: int = 1000
) -> tuple[float, float]:
    """(mean, std) of torch-fidelity's KID, poly kernel, subset size min(max_subset, n)."""
    import torch
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    gt, pred = _check_features(gt, pred)
    if not _usable(gt, pred, 2):
        return float("nan"), float("nan")
    out = kid_features_to_metric(
        torch.from_numpy(gt),
        torch.from_numpy(pred),
        kid_subsets=int(subsets),
        kid_subset_size=min(max_subset, gt.shape[0], pred.shape[0]),
        kid_kernel="poly",
        rng_seed=int(seed),
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(gt: np.ndarray, pred: np.ndarray, k: int = 5) -> dict[str, float]:
    """k-NN precision/recall/F1 (torch-fidelity prc, prediction = generated, GT = real)."""
    import torch
    from torch_fidelity.metric_prc import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    gt, pred = _check_features(gt, pred)
    if not _usable(gt, pred, k + 1):
        return {"Precision": float("nan"), "Recall": float("nan"), "F1": float("nan")}
    out = prc_features_to_metric(
        torch.from_numpy(pred), torch.from_numpy(gt), prc_neighborhood=k, verbose=False
    )
    return {
        "Precision": float(out[KEY_METRIC_PRECISION]),
        "Recall": float(out[KEY_METRIC_RECALL]),
        "F1": float(out[KEY_METRIC_F_SCORE]),
    }


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 of two 1-D samples: the integral of |F_a - F_b| (scipy.stats.wasserstein_distance)."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    if a.size == b.size:  # equal sizes: the mean gap of the sorted samples
        return float(np.mean(np.abs(a - b)))
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, grid[:-1], side="right") / a.size
    fb = np.searchsorted(b, grid[:-1], side="right") / b.size
    return float(np.sum(np.abs(fa - fb) * np.diff(grid)))


def mind(gt: np.ndarray, pred: np.ndarray, n_projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance (MIND, see module doc); NaN below two rows per side."""
    gt, pred = _check_features(gt, pred)
    if not _usable(gt, pred, 2):
        return float("nan")
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_projections, gt.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    a = gt @ dirs.T
    b = pred @ dirs.T
    return float(np.mean([wasserstein_1d(a[:, i], b[:, i]) for i in range(n_projections)]))


def _robust_scale(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    med = np.median(train, axis=0)
    mad = np.median(np.abs(train - med), axis=0)
    mad[mad <= 0] = 1.0
    return (train - med) / mad, (test - med) / mad


def group_folds(groups: Sequence, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) row indices, whole groups per fold; largest group first to the lightest fold.

    sklearn's GroupKFold rule (unshuffled), implemented here so the step does not
    pay sklearn's ~1 s import.
    """
    names, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    n_splits = min(n_splits, len(names))
    load = np.zeros(n_splits, dtype=np.int64)
    fold_of = np.zeros(len(names), dtype=np.intp)
    for gi in np.argsort(-counts, kind="stable"):
        fold_of[gi] = int(np.argmin(load))
        load[fold_of[gi]] += counts[gi]
    row_fold = fold_of[inverse.ravel()]
    return [(np.flatnonzero(row_fold != k), np.flatnonzero(row_fold == k)) for k in range(n_splits)]


def logistic_fit(
    x: np.ndarray, y: np.ndarray, c: float = 1.0, tol: float = 1e-10, max_iter: int = 100
) -> tuple[np.ndarray, float]:
    """L2 logistic regression by Newton's method: sklearn LogisticRegression(C=c)'s optimum.

    Minimises c·Σ log(1 + exp(-s_i (x_i·w + b))) + ||w||²/2 (intercept unpenalised).
    """
    xa = np.column_stack([x, np.ones(len(x))])
    reg = np.ones(xa.shape[1])
    reg[-1] = 0.0
    w = np.zeros(xa.shape[1])

    def loss(v: np.ndarray) -> float:
        z = xa @ v
        return float(c * np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * v * v))

    current = loss(w)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(xa @ w)))
        grad = c * xa.T @ (p - y) + reg * w
        hess = c * (xa.T * (p * (1 - p))) @ xa + np.diag(reg) + 1e-12 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:  # backtracking keeps Newton monotone on near-separable data
            new = loss(w - t * step)
            if new <= current:
                break
            t *= 0.5
        w = w - t * step
        done = abs(current - new) <= tol * max(1.0, abs(new)) or np.max(np.abs(t * step)) < tol
        current = new
        if done:
            break
    return w[:-1], float(w[-1])


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties counted 1/2."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse.ravel()]  # average 1-based rank of ties
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def real_vs_pred_probe(
    gt: np.ndarray,
    pred: np.ndarray,
    groups_gt: Sequence,
    groups_pred: Sequence,
    n_splits: int = 5,
) -> dict:
    """Linear GT-vs-prediction probe: AUROC mean/std over group folds (see module doc).

    Returns AUROC, AUROC_std, Indistinguishability and the per-fold AUROCs
    ("folds"). Folds whose test part holds only one class are skipped.
    """
    nan = {"AUROC": float("nan"), "AUROC_std": float("nan"), "Indistinguishability": float("nan")}
    gt, pred = _check_features(gt, pred)
    groups = np.asarray([*groups_gt, *groups_pred], dtype=object).astype(str)
    if len(groups) != gt.shape[0] + pred.shape[0]:
        raise ValueError("one group label per feature row is required")
    if len(np.unique(groups)) < 2 or not _usable(gt, pred, 1):
        return {**nan, "folds": []}
    x = np.concatenate([gt, pred])
    y = np.concatenate([np.zeros(len(gt)), np.ones(len(pred))])
    folds = []
    for train, test in group_folds(groups, n_splits):
        if len(np.unique(y[test])) < 2 or len(np.unique(y[train])) < 2:
            continue
        xtr, xte = _robust_scale(x[train], x[test])
        w, b = logistic_fit(xtr, y[train])
        folds.append(auroc(y[test], xte @ w + b))
    if not folds:
        return {**nan, "folds": []}
    mean = float(np.mean(folds))
    return {
        "AUROC": mean,
        "AUROC_std": float(np.std(folds)),
        "Indistinguishability": 1.0 - 2.0 * abs(mean - 0.5),
        "folds": folds,
    }


def median_cosine_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    """Median over rows of cos(gt_i, pred_i) for paired rows; zero vectors skipped."""
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(
            f"paired feature matrices must have equal (n, d) shapes: {gt.shape}, {pred.shape}"
        )
    if gt.shape[0] == 0 or gt.shape[1] == 0:
        return float("nan")
    norms = np.linalg.norm(gt, axis=1) * np.linalg.norm(pred, axis=1)
    ok = norms > 0
    if not ok.any():
        return float("nan")
    cos = np.sum(gt[ok] * pred[ok], axis=1) / norms[ok]
    cos = cos[np.isfinite(cos)]
    return float(np.median(cos)) if cos.size else float("nan")


FEATURE_GROUP_COLUMNS = ["n_cells", "CP_FID", "CP_KID", "CP_KID_std", "CP_Median_Cosine_Similarity"]
FEATURE_DATASET_COLUMNS = [
    f"Dataset_CP_{m}"
    for m in (
        *("FID", "KID", "KID_std", "Precision", "Recall", "F1", "MIND"),
        *("RealVsPred_AUROC", "RealVsPred_AUROC_std", "Indistinguishability"),
    )
]


def feature_metrics(
    gt: pd.DataFrame,
    pred: pd.DataFrame,
    columns: Sequence[str],
    groups: Sequence[tuple] | None = None,
    keys: Sequence[str] = ("fov", "t", "cell_id"),
    group: Sequence[str] = ("fov", "t"),
    kid_subsets: int = 50,
    seed: int = 0,
    prc_k: int = 5,
    probe_group: str = "fov",
) -> pd.DataFrame:
    """Per-group FID/KID/cosine similarity and the dataset-level metrics on every row.

    Cells are paired on `keys` (inner join), standardized once with the
    statistics of all paired GT cells (`standardize`), then compared per
    `group` value and over the whole set (Dataset_* columns, repeated on every
    row). The probe sees the unstandardized kept columns (it scales inside its
    folds) and groups its folds by `probe_group`. `groups` lists the rows to
    report (e.g. every (fov, t) imaged, with or without cells); by default the
    groups present in either table.
    """
    import pandas as pd

    columns = [c for c in columns if c in gt.columns and c in pred.columns]
    keys = list(keys)
    group = list(group)
    merged = gt[keys + columns].merge(pred[keys + columns], on=keys, suffixes=("_gt", "_pred"))
    merged = merged.sort_values(keys, kind="stable").reset_index(drop=True)
    g = merged[[f"{c}_gt" for c in columns]].to_numpy(dtype=np.float64)
    p = merged[[f"{c}_pred" for c in columns]].to_numpy(dtype=np.float64)
    gz, pz, kept = standardize(g, p)
    kid_mean, kid_std = kid(gz, pz, kid_subsets, seed)
    prc = precision_recall(gz, pz, prc_k)
    fov = merged[probe_group].to_numpy() if len(merged) else np.zeros(0)
    probe = real_vs_pred_probe(g[:, kept], p[:, kept], fov, fov)
    dataset = dict(
        zip(
            FEATURE_DATASET_COLUMNS,
            (
                fid(gz, pz),
                kid_mean,
                kid_std,
                prc["Precision"],
                prc["Recall"],
                prc["F1"],
                mind(gz, pz, seed=seed),
                probe["AUROC"],
                probe["AUROC_std"],
                probe["Indistinguishability"],
            ),
            strict=True,
        )
    )

    if groups is None:
        present = pd.concat([gt[group], pred[group]]).drop_duplicates()
        groups = sorted(tuple(v) for v in present.itertuples(index=False))
    index = {}
    if len(merged):
        for key, sel in merged.groupby(group, sort=False).indices.items():
            index[key if isinstance(key, tuple) else (key,)] = sel
    rows = []
    for values in groups:
        values = tuple(values)
        sel = index.get(values, np.zeros(0, dtype=np.intp))
        kid_g = kid(gz[sel], pz[sel], kid_subsets, seed)
        rows.append(
            {
                **dict(zip(group, values, strict=True)),
                "n_cells": len(sel),
                "CP_FID": fid(gz[sel], pz[sel]),
                "CP_KID": kid_g[0],
                "CP_KID_std": kid_g[1],
                "CP_Median_Cosine_Similarity": median_cosine_similarity(gz[sel], pz[sel]),
                **dataset,
            }
        )
    return pd.DataFrame(rows, columns=[*group, *FEATURE_GROUP_COLUMNS, *FEATURE_DATASET_COLUMNS])


# --------------------------------------------------------------------------- instances

AP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
INSTANCE_COLUMNS = [
    "n_gt",
    "n_pred",
    *(f"AP_{th:.2f}" for th in AP_THRESHOLDS),
    *("mAP", "PQ", "SQ", "RQ"),
]


def _dense_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 0 (background), 1..n in sorted order, flattened; and n."""
    flat = np.ravel(labels)
    if flat.dtype.kind in "iub" and flat.size and 0 <= flat.min() and flat.max() < 1 << 24:
        flat = flat.astype(np.intp, copy=False)  # bincount: O(n), no sort
        present = np.bincount(flat) > 0
        present[0] = True
        lut = np.cumsum(present) - 1
        return lut[flat], int(present.sum() - 1)
    ids, inv = np.unique(flat, return_inverse=True)
    has_bg = bool(ids.size and ids[0] == 0)
    return inv.ravel() + (0 if has_bg else 1), int(ids.size - has_bg)


def instance_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n_gt, n_pred) IoU matrix of the labelled objects (label > 0), in sorted label order."""
    g = np.asarray(gt)
    p = np.asarray(pred)
    _check_pair(g, p)
    g_inv, n_g = _dense_labels(g)
    p_inv, n_p = _dense_labels(p)
    joint = np.bincount(g_inv * (n_p + 1) + p_inv, minlength=(n_g + 1) * (n_p + 1))
    joint = joint.reshape(n_g + 1, n_p + 1)
    inter = joint[1:, 1:].astype(np.float64)
    size_g = joint[1:, :].sum(axis=1).astype(np.float64)
    size_p = joint[:, 1:].sum(axis=0).astype(np.float64)
    union = size_g[:, None] + size_p[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_instances(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches with IoU >= threshold, maximising their number (cellpose's rule).

    Returns (gt index, pred index) of the matched pairs. The cost is cellpose's
    `_true_positive`: -(IoU >= th) - IoU / (2 n_min), i.e. the most matches,
    ties broken by the larger total IoU.
    """
    if iou.size == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty
    if min(iou.shape) == 1:  # one object on a side (binary masks): the best partner
        k = int(np.argmax(iou))
        gi, pi = np.unravel_index(k, iou.shape)
        n = int(iou[gi, pi] >= threshold)
        return np.array([gi] * n, dtype=np.intp), np.array([pi] * n, dtype=np.intp)
    from scipy.optimize import linear_sum_assignment

    n_min = min(iou.shape)
    costs = -(iou >= threshold).astype(np.float64) - iou / (2 * n_min)
    gi, pi = linear_sum_assignment(costs)
    ok = iou[gi, pi] >= threshold
    return gi[ok], pi[ok]


def instance_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Object-level metrics of two label images (see module doc: AP, mAP, PQ, SQ, RQ)."""
    iou = instance_iou(gt, pred)
    n_gt, n_pred = iou.shape
    out: dict[str, float] = {"n_gt": n_gt, "n_pred": n_pred}
    aps = []
    for th in AP_THRESHOLDS:
        tp = len(match_instances(iou, th)[0])
        ap = _ratio(tp, n_gt + n_pred - tp)  # TP / (TP + FP + FN)
        out[f"AP_{th:.2f}"] = ap
        aps.append(ap)
    out["mAP"] = float(np.mean(aps)) if n_gt + n_pred else float("nan")
    gi, pi = match_instances(iou, 0.5)
    tp = len(gi)
    rq_den = tp + 0.5 * (n_gt - tp) + 0.5 * (n_pred - tp)
    out["SQ"] = float(iou[gi, pi].mean()) if tp else float("nan")
    out["RQ"] = _ratio(tp, rq_den)
    out["PQ"] = _ratio(float(iou[gi, pi].sum()), rq_den)  # = SQ·RQ, and 0 when TP = 0
    return {k: out[k] for k in INSTANCE_COLUMNS}
