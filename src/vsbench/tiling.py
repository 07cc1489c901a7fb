"""Overlapping YX tiles and seamless blending, shared by predict and reconstruct.

Each tile's result is weighted by a separable tent (pyramid) that is highest at the
tile centre, so tile borders — where a network sees padding instead of context, or a
periodic FFT wraps around — count least, and the normalized weighted sum has no seams.
Pure numpy: the torch callers move the weights to their device.
"""

from __future__ import annotations

import numpy as np


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile origins covering [0, size): stride tile·(1 − overlap), last tile flush with the end."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile >= size:
        return [0]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def tile_origins(yx_shape, tile: int, overlap: float) -> list[tuple[int, int]]:
    """Row-major (y0, x0) origins of square tiles (clipped to the image) covering (Y, X)."""
    ny, nx = (int(s) for s in yx_shape)
    ty, tx = min(int(tile), ny), min(int(tile), nx)
    return [(y0, x0) for y0 in tile_starts(ny, ty, overlap) for x0 in tile_starts(nx, tx, overlap)]


def tent(n: int) -> np.ndarray:
    """1-D tent weights in (0, 1]: 1 at the centre, 1/ceil(n/2) at the edges (never zero)."""
    i = np.arange(n, dtype=np.float32)
    w = np.minimum(i + 1, n - i)
    return w / w.max()


WEIGHTS = ("tent", "gaussian")


def gaussian(n: int, sigma_fraction: float = 0.125) -> np.ndarray:
    """1-D Gaussian weights, σ = n/8 (nnU-Net's choice), peak 1, floored at 1e-3 (never zero)."""
    i = np.arange(n, dtype=np.float64)
    sigma = max(n * sigma_fraction, 1e-6)
    w = np.exp(-0.5 * ((i - (n - 1) / 2) / sigma) ** 2)
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def blend_weights(*sizes: int, kind: str = "tent") -> np.ndarray:
    """Separable weights for one tile of shape `sizes` (any number of axes): tent or gaussian."""
    if kind not in WEIGHTS:
        raise ValueError(f"blend weights must be one of {WEIGHTS}, got {kind!r}")
    one_d = tent if kind == "tent" else gaussian
    w = np.ones((), dtype=np.float32)
    for n in sizes:
        w = np.multiply.outer(w, one_d(int(n)))
    return w.astype(np.float32)


def blend(tiles, origins, yx_shape) -> np.ndarray:
    """Tent-weighted average of (…, ty, tx) tiles placed at `origins` into (…, Y, X)."""
    tiles = [np.asarray(t, dtype=np.float32) for t in tiles]
    if not tiles or len(tiles) != len(origins):
        raise ValueError(f"{len(tiles)} tiles for {len(origins)} origins")
    ny, nx = (int(s) for s in yx_shape)
    out = np.zeros((*tiles[0].shape[:-2], ny, nx), dtype=np.float32)
    weight_sum = np.zeros((ny, nx), dtype=np.float32)
    for t, (y0, x0) in zip(tiles, origins, strict=True):
        ty, tx = t.shape[-2:]
        w = blend_weights(ty, tx)
        out[..., y0 : y0 + ty, x0 : x0 + tx] += t * w
        weight_sum[y0 : y0 + ty, x0 : x0 + tx] += w
    if (weight_sum <= 0).any():
        raise ValueError("tiles do not cover the whole image")
    return out / weight_sum
