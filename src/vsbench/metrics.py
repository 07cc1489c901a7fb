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


def feature_metrics(
    gt: pd.DataFrame,
    pred: pd.DataFrame,
    columns: Sequence[str],
    groups: Sequence[tuple] | None = None,
    keys: Sequence[str] = ("fov", "t", "cell_id"),
    group: Sequence[str] = ("fov", "t"),
) -> pd.DataFrame:
    """Per-group n_cells, CP_FID, CP_Median_Cosine_Similarity and the dataset-level FID.

    Cells are paired on `keys` (inner join), standardized once with the
    statistics of all paired GT cells, then compared per `group` value and
    over the whole set (Dataset_CP_FID, repeated on every row). `groups`
    lists the rows to report (e.g. every (fov, t) imaged, with or without
    cells); by default the groups present in either table.
    """
    import pandas as pd

    columns = [c for c in columns if c in gt.columns and c in pred.columns]
    keys = list(keys)
    group = list(group)
    merged = gt[keys + columns].merge(pred[keys + columns], on=keys, suffixes=("_gt", "_pred"))
    merged = merged.sort_values(keys, kind="stable").reset_index(drop=True)
    g = merged[[f"{c}_gt" for c in columns]].to_numpy(dtype=np.float64)
    p = merged[[f"{c}_pred" for c in columns]].to_numpy(dtype=np.float64)
    gz, pz, _ = standardize(g, p)
    dataset_fid = fid(gz, pz)

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
        rows.append(
            {
                **dict(zip(group, values, strict=True)),
                "n_cells": len(sel),
                "CP_FID": fid(gz[sel], pz[sel]),
                "CP_Median_Cosine_Similarity": median_cosine_similarity(gz[sel], pz[sel]),
                "Dataset_CP_FID": dataset_fid,
            }
        )
    out = [*group, "n_cells", "CP_FID", "CP_Median_Cosine_Similarity", "Dataset_CP_FID"]
    return pd.DataFrame(rows, columns=out)
