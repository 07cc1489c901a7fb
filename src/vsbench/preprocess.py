"""Preprocess: input validation and normalization statistics.

Statistics follow the reference convention: computed on a strided sample
(every `stride`-th pixel in Y and X), stored in `.zattrs["normalization"]`
as `{channel: {"dataset_statistics"|"fov_statistics": {...},
"timepoint_statistics": {t: {...}}}}`. Transforms read them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vsbench.io import InputError

STAT_KEYS = ("mean", "std", "median", "iqr", "min", "max", "p1", "p5", "p95", "p99")
NORMALIZATIONS = ("median_iqr", "mean_std", "p1_p99")


def statistics_from_sample(sample) -> dict[str, float]:
    """Statistics of a 1-D sample (numpy or dask); one pass of dask when lazy."""
    import dask
    import dask.array as da

    x = sample.ravel() if isinstance(sample, np.ndarray) else sample.reshape(-1)
    xd = da.from_array(x, chunks=max(1, x.size)) if isinstance(x, np.ndarray) else x
    qs = [1, 5, 25, 50, 75, 95, 99]
    mean, std, lo, hi, pct = dask.compute(
        xd.mean(), xd.std(), xd.min(), xd.max(), da.percentile(xd.rechunk(-1), qs)
    )
    p = dict(zip(qs, np.asarray(pct, dtype=float), strict=True))
    return {
        "mean": float(mean),
        "std": float(std),
        "median": p[50],
        "iqr": p[75] - p[25],
        "min": float(lo),
        "max": float(hi),
        "p1": p[1],
        "p5": p[5],
        "p95": p[95],
        "p99": p[99],
    }


def strided_sample(volume, stride: int):
    """Every `stride`-th pixel in Y and X of a (..., Y, X) array (numpy or dask)."""
    return volume[..., ::stride, ::stride]


def fov_statistics(tzyx, stride: int) -> tuple[dict, dict[str, dict]]:
    """(FOV statistics, per-timepoint statistics) of one channel, (T, Z, Y, X)."""
    sample = strided_sample(tzyx, stride)
    per_t = {str(t): statistics_from_sample(sample[t]) for t in range(sample.shape[0])}
    return statistics_from_sample(sample), per_t


def normalize(x, stats: Mapping[str, float], method: str = "median_iqr"):
    """(x - median)/iqr, (x - mean)/std, or p1..p99 → [-1, 1]; scale floors avoid /0."""
    if method == "median_iqr":
        return (x - stats["median"]) / max(stats["iqr"], 1e-6)
    if method == "mean_std":
        return (x - stats["mean"]) / max(stats["std"], 1e-6)
    if method == "p1_p99":
        return 2.0 * (x - stats["p1"]) / max(stats["p99"] - stats["p1"], 1e-6) - 1.0
    raise ValueError(f"unknown normalization {method!r} (expected one of {NORMALIZATIONS})")


def validate_fov(
    data: np.ndarray | object,
    channel_names: Sequence[str],
    required: Sequence[str],
    scale_zyx: Sequence[float],
    where: str,
) -> None:
    """Shape, channels, scale checks that need no pixel reads."""
    shape = tuple(data.shape)
    if len(shape) != 5:
        raise InputError(f"{where}: expected a 5-D TCZYX array, got shape {shape}")
    if shape[2] < 2:
        raise InputError(f"{where}: expected a z-stack (Z >= 2), got Z={shape[2]}")
    if shape[1] != len(channel_names):
        raise InputError(
            f"{where}: array has {shape[1]} channels but metadata names {len(channel_names)}"
        )
    missing = [c for c in required if c not in channel_names]
    if missing:
        raise InputError(f"{where}: missing channel(s) {missing} (channels: {list(channel_names)})")
    if any((not np.isfinite(s)) or s <= 0 for s in scale_zyx):
        raise InputError(
            f"{where}: pixel size must be positive, got (z, y, x) = {tuple(scale_zyx)}"
        )


def check_values(volume: np.ndarray, where: str) -> None:
    """Finite values and some signal: NaN/Inf or an all-zero channel is bad input."""
    finite = np.isfinite(volume)
    if not finite.all():
        raise InputError(f"{where}: {int((~finite).sum())} non-finite voxel(s) (NaN/Inf)")
    if not np.any(volume):
        raise InputError(f"{where}: all voxels are zero")
