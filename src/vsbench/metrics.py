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
- Spectral_PCC: cubic.metrics.spectral_pcc(prediction, target) (parity-tested):
  both volumes mean-subtracted and Tukey-apodized (α 0.1, separable), Fourier
  transformed; weights per radial bin of the *target's* raw power spectrum
  (cubic's bins: one step of the finest frequency spacing, up to the lowest
  Nyquist, physical units), w = max(P − noise, 0) / max, noise = mean power of
  the top 20 % bins; r = Σ W Re(Fp F̄t) / √(Σ W|Fp|² Σ W|Ft|²), clipped.
- XY_FSC_Resolution / Z_FSC_Resolution: the prediction's resolution (µm) from
  cubic.metrics.fsc_resolution (single image, checkerboard split, 1/7
  threshold) after resampling to isotropic voxels; NaN when no crossing.
- PerCell_PCC_mean / _median: PCC inside each cell label (shared cell labels,
  >= 3 voxels, non-constant on both sides); NaN without such a cell.
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
  prediction row's ball; F1 their harmonic mean. Dataset level: mean and std
  (_std) over 10 seeded subsamples of 80 % of each side (without replacement:
  a duplicated row would shrink the k-NN balls). NaN below k + 1 rows per side.
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
  than two FOVs.
- condition probe (beyond the reference): does the prediction keep the phenotype the
  GT shows? The same linear probe telling mock cells from the other conditions
  (denv, zikv), trained and scored on GT features (Condition_AUROC_GT) and, apart,
  on the prediction's features of the same cells (Condition_AUROC_Pred); folds of
  whole FOVs, stratified so each test fold holds both classes, AUROC within each
  fold, averaged; NaN with one condition or fewer than two FOVs of either. A
  prediction that erases the phenotype falls towards 0.5 while the GT stays high.
  sklearn itself is only used by the parity tests: importing it
  (and scipy.stats) costs ~1 s per metrics job.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

# CSV contracts of the metrics rule: pixel.csv and mask.csv, one row per (FOV, t)
PIXEL_COLUMNS = [
    "FOV",
    "Timepoint",
    *("PCC", "SSIM", "NRMSE", "PSNR", "Spectral_PCC", "XY_FSC_Resolution", "Z_FSC_Resolution"),
    *("PerCell_PCC_mean", "PerCell_PCC_median"),
]
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


def _torch_pair(a, b, device, dtype=None):
    import torch

    dev = torch.device(device)
    dtype = dtype or (torch.float64 if dev.type == "cpu" else torch.float32)
    x = torch.as_tensor(np.asarray(a), device=dev).to(dtype)
    y = torch.as_tensor(np.asarray(b), device=dev).to(dtype)
    if x.shape != y.shape:
        raise ValueError(
            f"shape mismatch: ground truth {tuple(x.shape)} vs prediction {tuple(y.shape)}"
        )
    if x.numel() == 0:
        raise ValueError("empty volume")
    return x, y


def _minmax_t(x):
    import torch

    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.where(
        span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x)
    )


def _reflect_index(n: int, r: int, device):
    """scipy.ndimage 'reflect' (d c b a | a b c d | d c b a) padding indices, any r."""
    import torch

    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur3d(x, sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE, crop=None):
    """scipy.ndimage.gaussian_filter(mode="reflect") over the last three axes, in torch.

    Separable, as a sum of shifted slices of the reflect-padded array (one fused
    multiply-add per tap): on a CPU this beats both conv1d and scipy itself. `crop`
    ((z0, z1), (y0, y1), (x0, x1)) computes only that output block: X first, then Y, each
    within the block's extent along the axes already blurred, Z last and only for the
    block's slices (a thin stack's borders are a large share of it).
    """
    import torch

    r = int(truncate * sigma + 0.5)
    taps = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (taps / sigma) ** 2)
    w /= w.sum()
    lead = x.ndim - 3
    crop = crop or tuple((0, n) for n in x.shape[lead:])
    for axis in (2, 1, 0):
        lo, hi = crop[axis]
        dim = lead + axis
        index = _reflect_index(x.shape[dim], r, x.device)[lo : hi + 2 * r]
        padded = x.index_select(dim, index)
        out = torch.zeros_like(padded.narrow(dim, 0, hi - lo))
        for k, wk in enumerate(w):
            out.add_(padded.narrow(dim, k, hi - lo), alpha=float(wk))
        x = out
    return x


def _ssim_t(a, b):
    """Mean 3D SSIM of two volumes already on [0, 1] (see the module docstring)."""
    import torch

    a, b = a.float(), b.float()  # float32 blurs: within 1e-6 of float64, twice as fast
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    # the mean skips `radius` voxels at every border: blur only what is averaged
    crop = tuple((p, n - p) for n in a.shape for p in [min(radius, (n - 1) // 2)])
    stack = gaussian_blur3d(torch.stack([a, b, a * a, b * b, a * b]), crop=crop)
    ux, uy, xx, yy, xy = stack.unbind(0)
    vx, vy, vxy = xx - ux * ux, yy - uy * uy, xy - ux * uy
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(dtype=torch.float64)


def tukey_1d(n: int, alpha: float = 0.1) -> np.ndarray:
    """scipy.signal.windows.tukey(n, alpha) (symmetric), as cubic's apodization uses it."""
    if alpha <= 0 or n <= 1:
        return np.ones(max(n, 0))
    if alpha >= 1:
        return 0.5 * (1 - np.cos(2 * np.pi * np.arange(n) / (n - 1)))
    width = int(np.floor(alpha * (n - 1) / 2.0))
    n1 = np.arange(0, width + 1)
    w1 = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * n1 / alpha / (n - 1))))
    w2 = np.ones(max((n - width - 1) - (width + 1), 0))
    n3 = np.arange(n - width - 1, n)
    w3 = 0.5 * (1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * n3 / alpha / (n - 1))))
    return np.concatenate([w1, w2, w3])


@functools.lru_cache(maxsize=8)
def _radial_bins_cached(shape, spacing, device, bin_delta):
    return _radial_bins(shape, spacing, device, bin_delta)


def _radial_bins(shape, spacing, device, bin_delta: float = 1.0):
    """Per-voxel radial bin id of the unshifted FFT grid (DC = -1), cubic's radial binning:
    uniform bins of one index step of the finest frequency spacing up to the lowest Nyquist
    frequency (physical units), overflow clipped into the last bin."""
    import torch

    step = bin_delta * min(1.0 / (n * sp) for n, sp in zip(shape, spacing, strict=True))
    kmax = min((n // 2) / (n * sp) for n, sp in zip(shape, spacing, strict=True))
    nb = max(1, int(np.ceil(kmax / step)))
    edges = torch.as_tensor(np.linspace(0.0, kmax, nb + 1), dtype=torch.float64, device=device)
    index_units = all(abs(sp - 1.0) < 1e-10 for sp in spacing)  # as cubic's radial_bin_id
    # float32 frequencies and |k| as cubic computes them, compared with float64 edges
    axes = [
        torch.as_tensor(
            (np.fft.fftfreq(n) * n if index_units else np.fft.fftfreq(n, d=sp)).astype(np.float32),
            device=device,
        )
        for n, sp in zip(shape, spacing, strict=True)
    ]
    k0, k1, k2 = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    k = torch.sqrt(k0 * k0 + k1 * k1 + k2 * k2).double()
    bid = (torch.bucketize(k, edges, right=True) - 1).clamp(0, nb - 1)
    return torch.where(k < float(np.finfo(np.float32).tiny), torch.full_like(bid, -1), bid)


def _spectral_pcc_t(pred, target, spacing, alpha: float = 0.1, tail_fraction: float = 0.2):
    """cubic.metrics.spectral_pcc(prediction, target) in torch (parity-tested).

    On the rfft half spectrum: every sum cubic takes over the full spectrum is of a function
    even under k → −k (real inputs), so it is the half-spectrum sum with columns that stand
    for two full columns counted twice.
    """
    import torch

    pred, target = pred.float(), target.float()  # complex64 FFTs, as cubic
    shape = tuple(target.shape)
    win = torch.ones((), dtype=pred.dtype, device=pred.device)
    for axis, n in enumerate(shape):
        w = torch.as_tensor(tukey_1d(n, alpha), dtype=pred.dtype, device=pred.device)
        win = win * w.reshape([-1 if i == axis else 1 for i in range(3)])
    f_pred = torch.fft.rfftn((pred - pred.mean()) * win).reshape(-1)
    f_targ = torch.fft.rfftn((target - target.mean()) * win).reshape(-1)
    power_raw = torch.fft.rfftn(target).abs().reshape(-1) ** 2
    nx = shape[-1]
    half = nx // 2 + 1
    mult = torch.full((half,), 2.0, dtype=pred.dtype, device=pred.device)
    mult[0] = 1.0
    if nx % 2 == 0:
        mult[-1] = 1.0
    mult = mult.expand(*shape[:-1], half).reshape(-1)
    # every (FOV, t) of a job has the same shape and spacing: the bins are computed once
    bins = _radial_bins_cached(shape, tuple(spacing), pred.device, 1.0)
    bid = bins[..., :half].reshape(-1)
    valid = bid >= 0
    nbins = int(bid.max()) + 1
    s2 = torch.bincount(bid[valid], weights=(mult * power_raw)[valid], minlength=nbins)
    counts = torch.bincount(bid[valid], weights=mult[valid], minlength=nbins).clamp_min(1)
    power = s2 / counts
    n_tail = max(1, int(np.ceil(nbins * tail_fraction)))
    weights = (power - power[-n_tail:].mean()).clamp_min(0.0)
    w_max = weights.max()
    weights = weights / torch.where(w_max > 0, w_max, torch.ones_like(w_max))
    w_vox = torch.where(valid, weights[bid.clamp_min(0)], torch.zeros_like(power_raw)) * mult
    num = (w_vox * (f_pred * f_targ.conj()).real).sum()
    den = torch.sqrt((w_vox * f_pred.abs() ** 2).sum() * (w_vox * f_targ.abs() ** 2).sum())
    safe = torch.where(den < 1e-12, torch.ones_like(den), den)
    r = torch.where(den < 1e-12, torch.zeros_like(num), num / safe)
    return torch.where(w_max > 0, r.clamp(-1.0, 1.0), torch.zeros_like(r))


def _pcc_t(a, b):
    da, db = a - a.mean(), b - b.mean()
    den = ((da * da).sum() * (db * db).sum()).sqrt()
    return ((da * db).sum() / den).clamp(-1.0, 1.0)  # 0/0 -> NaN: a constant volume


def _per_cell_pcc_t(a, b, cells):
    """PCC inside each cell label (>= 3 voxels, non-constant on both sides), mean and median."""
    import torch

    lab = torch.as_tensor(np.asarray(cells), device=a.device).reshape(-1).long()
    x, y = a.reshape(-1), b.reshape(-1)
    keep = lab > 0
    lab, x, y = lab[keep], x[keep], y[keep]
    if lab.numel() == 0:
        nan = torch.full((), float("nan"), dtype=a.dtype, device=a.device)
        return nan, nan
    n_lab = int(lab.max()) + 1
    sums = {k: torch.bincount(lab, weights=v, minlength=n_lab) for k, v in
            (("x", x), ("y", y), ("xx", x * x), ("yy", y * y), ("xy", x * y))}  # fmt: skip
    n = torch.bincount(lab, minlength=n_lab).to(a.dtype)
    cov = sums["xy"] - sums["x"] * sums["y"] / n.clamp_min(1)
    vx = sums["xx"] - sums["x"] ** 2 / n.clamp_min(1)
    vy = sums["yy"] - sums["y"] ** 2 / n.clamp_min(1)
    tol = 1e-12 * n.clamp_min(1)
    ok = (n >= 3) & (vx > tol) & (vy > tol)
    r = (cov / (vx * vy).clamp_min(1e-300).sqrt())[ok].clamp(-1.0, 1.0)
    if r.numel() == 0:
        nan = torch.full((), float("nan"), dtype=a.dtype, device=a.device)
        return nan, nan
    v = r.sort().values
    return r.mean(), (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # numpy's median


def fsc_resolution(volume: np.ndarray, spacing) -> tuple[float, float]:
    """(XY, Z) FSC resolution (µm, 1/7 threshold, single-image checkerboard split) from
    cubic.metrics.fsc_resolution, on the volume resampled to isotropic voxels (a stack of a
    few slices otherwise has too few Z frequencies for cubic's curve fit); NaN when cubic
    finds no crossing."""
    import warnings

    from cubic.metrics import fsc_resolution as _fsc

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _fsc(
                np.asarray(volume, dtype=np.float32), spacing=list(spacing), resample_isotropic=True
            )
        return float(res["xy"]), float(res["z"])
    except (ValueError, RuntimeError, IndexError, ZeroDivisionError):
        return float("nan"), float("nan")


def pixel_metrics(
    gt: np.ndarray,
    pred: np.ndarray,
    spacing=None,
    cells: np.ndarray | None = None,
    device: str = "cpu",
    fsc: bool = False,
) -> dict[str, float]:
    """The pixel-metric bundle of one (Z, Y, X) pair, computed on `device` with one transfer
    of the results: PCC, SSIM, NRMSE, PSNR; with `spacing` (z, y, x µm) Spectral_PCC and,
    with `fsc`, the prediction's XY/Z FSC resolution (cubic, CPU); with `cells` (instance
    labels) the per-cell PCC mean and median."""
    import torch

    a, b = _torch_pair(gt, pred, device)
    am, bm = _minmax_t(a), _minmax_t(b)
    mse = ((am - bm) ** 2).mean()
    span = am.max() - am.min()
    rmse = mse.sqrt()
    values = {
        "PCC": _pcc_t(a, b),
        "SSIM": _ssim_t(am, bm),
        "NRMSE": torch.where(
            span > 0, rmse / torch.where(span > 0, span, torch.ones_like(span)), rmse
        ),
        "PSNR": torch.where(
            mse > 0, 10 * torch.log10(1 / mse.clamp_min(1e-300)), torch.full_like(mse, math.inf)
        ),
    }
    if spacing is not None:
        values["Spectral_PCC"] = _spectral_pcc_t(b, a, [float(s) for s in spacing])
    if cells is not None:
        values["PerCell_PCC_mean"], values["PerCell_PCC_median"] = _per_cell_pcc_t(a, b, cells)
    host = torch.stack([v.to(torch.float64).reshape(()) for v in values.values()]).cpu().tolist()
    out = dict(zip(values, host, strict=True))
    if fsc and spacing is not None:
        out["XY_FSC_Resolution"], out["Z_FSC_Resolution"] = fsc_resolution(pred, spacing)
    return {k: out[k] for k in PIXEL_COLUMNS[2:] if k in out}


def ssim3d(a: np.ndarray, b: np.ndarray) -> float:
    """Mean 3D SSIM of the min–max scaled pair (Gaussian window, see module doc)."""
    return pixel_metrics(a, b)["SSIM"]


def nrmse(a: np.ndarray, b: np.ndarray) -> float:
    """RMSE of the min–max scaled pair divided by the scaled GT's range (see module doc)."""
    return pixel_metrics(a, b)["NRMSE"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of the min–max scaled pair with data range 1; +inf when identical."""
    return pixel_metrics(a, b)["PSNR"]


def spectral_pcc(gt: np.ndarray, pred: np.ndarray, spacing) -> float:
    """Spectrally weighted PCC (cubic's definition; weights from the GT's radial spectrum)."""
    return pixel_metrics(gt, pred, spacing=spacing)["Spectral_PCC"]


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


PRC_BOOTSTRAP = 10
PRC_FRACTION = 0.8


def precision_recall(
    gt: np.ndarray,
    pred: np.ndarray,
    k: int = 5,
    n_boot: int = 0,
    seed: int = 0,
    fraction: float = PRC_FRACTION,
) -> dict[str, float]:
    """k-NN precision/recall/F1 (torch-fidelity prc, prediction = generated, GT = real).

    With `n_boot` > 0: the mean and std over `n_boot` seeded subsamples of `fraction` of
    each side's rows (without replacement: duplicated rows would collapse the k-NN balls).
    """
    import torch
    from torch_fidelity.metric_prc import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    gt, pred = _check_features(gt, pred)
    nan = {
        k_: float("nan")
        for k_ in ("Precision", "Recall", "F1", "Precision_std", "Recall_std", "F1_std")
    }
    if not _usable(gt, pred, k + 1):
        return nan

    def once(g, p):
        out = prc_features_to_metric(
            torch.from_numpy(p), torch.from_numpy(g), prc_neighborhood=k, verbose=False
        )
        return [
            float(out[key]) for key in (KEY_METRIC_PRECISION, KEY_METRIC_RECALL, KEY_METRIC_F_SCORE)
        ]

    if n_boot <= 0:
        values = np.array([once(gt, pred)])
    else:
        rng = np.random.default_rng([seed, 5])
        n_g, n_p = (max(k + 1, int(round(fraction * len(x)))) for x in (gt, pred))
        if min(n_g, n_p) > min(len(gt), len(pred)):
            values = np.array([once(gt, pred)])
        else:
            values = np.array([
                once(gt[rng.choice(len(gt), n_g, replace=False)], pred[rng.choice(len(pred), n_p, replace=False)])
                for _ in range(n_boot)
            ])  # fmt: skip
    mean, std = values.mean(axis=0), values.std(axis=0)
    return {
        "Precision": mean[0], "Recall": mean[1], "F1": mean[2],
        "Precision_std": std[0], "Recall_std": std[1], "F1_std": std[2],
    }  # fmt: skip


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


def condition_probe(x: np.ndarray, labels: Sequence, groups: Sequence, reference: str = "mock",
                    n_splits: int = 5) -> float:  # fmt: skip
    """AUROC of a linear probe telling `reference` cells from the other conditions.

    Folds are whole FOVs, stratified: each class's FOVs (sorted by name) are dealt in turn
    to k = min(n_splits, FOVs of the rarer class) folds, so every test fold holds both
    classes and no cell is scored by a probe that saw its own FOV. Median/MAD scaling and
    the logistic regression are fitted on each fold's training FOVs; the AUROC is taken
    within each test fold and averaged (pooling scores across folds would compare
    different intercepts: with few FOVs that alone pushes a null probe far below 0.5).
    NaN with one class or fewer than two FOVs of either class.
    """
    x = np.asarray(x, dtype=np.float64)
    y = (np.asarray(labels).astype(str) != reference).astype(float)
    groups = np.asarray(groups).astype(str)
    if x.ndim != 2 or x.shape[1] == 0 or len(np.unique(y)) < 2:
        return float("nan")
    fovs = {c: sorted(set(groups[y == c])) for c in (0.0, 1.0)}
    k = min(n_splits, len(fovs[0.0]), len(fovs[1.0]))
    if k < 2:
        return float("nan")
    fold_of = {f: i % k for c in (0.0, 1.0) for i, f in enumerate(fovs[c])}
    row_fold = np.array([fold_of[g] for g in groups])
    scores = []
    for fold in range(k):
        train, test = row_fold != fold, row_fold == fold
        xtr, xte = _robust_scale(x[train], x[test])
        w, b = logistic_fit(xtr, y[train])
        scores.append(auroc(y[test], xte @ w + b))
    return float(np.nanmean(scores))


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


GROUP_METRICS = ("FID", "KID", "KID_std", "Median_Cosine_Similarity")
DATASET_METRICS = (
    *("FID", "KID", "KID_std", "Precision", "Precision_std", "Recall", "Recall_std"),
    *("F1", "F1_std", "MIND", "Median_Cosine_Similarity"),
    *("RealVsPred_AUROC", "RealVsPred_AUROC_std", "Indistinguishability"),
    *("Condition_AUROC_GT", "Condition_AUROC_Pred"),
)


def feature_group_columns(prefix: str = "CP") -> list[str]:
    return ["n_cells", *(f"{prefix}_{m}" for m in GROUP_METRICS)]


def feature_dataset_columns(prefix: str = "CP") -> list[str]:
    return [f"Dataset_{prefix}_{m}" for m in DATASET_METRICS]


FEATURE_GROUP_COLUMNS = feature_group_columns()
FEATURE_DATASET_COLUMNS = feature_dataset_columns()


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
    prc_bootstrap: int = PRC_BOOTSTRAP,
    prefix: str = "CP",
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
    prc = precision_recall(gz, pz, prc_k, n_boot=prc_bootstrap, seed=seed)
    fov = merged[probe_group].to_numpy() if len(merged) else np.zeros(0)
    probe = real_vs_pred_probe(g[:, kept], p[:, kept], fov, fov)
    if "condition" in gt.columns and len(merged):
        cond = merged[keys].merge(gt[keys + ["condition"]], on=keys)["condition"].to_numpy()
        condition = [condition_probe(x[:, kept], cond, fov) for x in (g, p)]
    else:
        condition = [float("nan"), float("nan")]
    dataset = dict(
        zip(
            feature_dataset_columns(prefix),
            (
                fid(gz, pz),
                kid_mean,
                kid_std,
                prc["Precision"],
                prc["Precision_std"],
                prc["Recall"],
                prc["Recall_std"],
                prc["F1"],
                prc["F1_std"],
                mind(gz, pz, seed=seed),
                median_cosine_similarity(gz, pz),
                probe["AUROC"],
                probe["AUROC_std"],
                probe["Indistinguishability"],
                *condition,
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
                f"{prefix}_FID": fid(gz[sel], pz[sel]),
                f"{prefix}_KID": kid_g[0],
                f"{prefix}_KID_std": kid_g[1],
                f"{prefix}_Median_Cosine_Similarity": median_cosine_similarity(gz[sel], pz[sel]),
                **dataset,
            }
        )
    columns = [*group, *feature_group_columns(prefix), *feature_dataset_columns(prefix)]
    return pd.DataFrame(rows, columns=columns)


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
