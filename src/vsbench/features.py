"""Per-cell CellProfiler-like features over instance labels.

The same cell labels are used for the ground truth and every prediction, so
rows pair up by (fov, t, cell_id). Intensity features are computed on the
image as given; callers pass it clipped to the FOV's p1–p99 and scaled to
[0, 1] (`vsbench.segment.scale_unit`) so GT and predictions share a scale.

Definitions (per cell, over its voxels):
- volume: voxel count; centroid_z/y/x: mean voxel index (pixels).
- mean/std (population, ddof 0)/min/max; p10..p90 by linear interpolation
  (numpy default); iqr = p75 - p25.
- skewness and excess kurtosis: biased moment estimators (scipy.stats.skew /
  kurtosis defaults); 0 for a cell whose voxels are all equal (a
  convention that keeps the feature matrix finite).
- gradient_mean/std: 3D Sobel gradient magnitude (pixel units, Z not
  rescaled); laplacian_var: variance of the 3D discrete Laplacian.
- area: the cell's pixel count on its central slice (round(centroid_z)).
- glcm_*: grey-level co-occurrence texture of the cell on its central slice:
  the [0, 1] image quantized to 32 levels (floor(32·x), clipped), pixels outside
  the cell excluded (pairs touching them dropped), distance 1, angles 0°, 45°,
  90°, 135°, symmetric, each angle's matrix normalized, skimage's graycoprops
  (contrast, dissimilarity, homogeneity, ASM, energy, correlation, entropy)
  averaged over the angles. A cell with no pixel pair inside gets 0 (the
  convention that keeps the matrix finite).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

ID_COLUMNS = ("fov", "t", "cell_id", "condition")
SHAPE_FEATURES = ("volume", "area", "centroid_z", "centroid_y", "centroid_x")
GLCM_LEVELS = 32
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "ASM", "energy", "correlation", "entropy")
TEXTURE_FEATURES = tuple(f"glcm_{p.lower()}" for p in GLCM_PROPS)
PERCENTILES = (10, 25, 50, 75, 90)
INTENSITY_FEATURES = (
    "mean",
    "std",
    "min",
    "max",
    *(f"p{q}" for q in PERCENTILES),
    "iqr",
    "skewness",
    "kurtosis",
    "gradient_mean",
    "gradient_std",
    "laplacian_var",
)
# what the image determines (GT and prediction differ in these); shape comes from the labels
IMAGE_FEATURES = (*INTENSITY_FEATURES, *TEXTURE_FEATURES)
FEATURES = (*SHAPE_FEATURES, *IMAGE_FEATURES)


def glcm_features(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """GLCM texture of the pixels of a 2D `mask` in a [0, 1] `image` (see the module doc)."""
    from skimage.feature import graycomatrix, graycoprops

    q = np.clip(np.floor(np.asarray(image, dtype=np.float64) * GLCM_LEVELS), 0, GLCM_LEVELS - 1)
    q = np.where(mask, q.astype(np.uint8) + 1, 0).astype(np.uint8)  # 0 = outside the cell
    angles = [0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    counts = graycomatrix(q, [1], angles, levels=GLCM_LEVELS + 1, symmetric=True)
    inside = counts[1:, 1:].astype(np.float64)
    totals = inside.sum(axis=(0, 1), keepdims=True)
    if not (totals > 0).all():
        return dict.fromkeys(TEXTURE_FEATURES, 0.0)
    p = inside / totals
    return {
        name: float(graycoprops(p, prop).mean())
        for name, prop in zip(TEXTURE_FEATURES, GLCM_PROPS, strict=True)
    }


def cell_features(image: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per label > 0 present in `labels`: cell_id plus FEATURES, sorted by cell_id."""
    import pandas as pd
    from scipy import ndimage as ndi

    image = np.asarray(image, dtype=np.float64)
    labels = np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be equal ZYX shapes")
    flat = labels.ravel()
    fg = np.flatnonzero(flat > 0)
    columns = ["cell_id", *FEATURES]
    if fg.size == 0:
        return pd.DataFrame(
            {c: pd.Series(dtype="int64" if c == "cell_id" else "float64") for c in columns}
        )

    order = fg[np.argsort(flat[fg], kind="stable")]
    ids, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    n = counts.astype(np.float64)

    def grouped_mean(v: np.ndarray) -> np.ndarray:
        return np.add.reduceat(v, starts) / n

    vals = image.ravel()[order]
    mean = grouped_mean(vals)
    centred = vals - np.repeat(mean, counts)
    m2 = grouped_mean(centred**2)
    m3 = grouped_mean(centred**3)
    m4 = grouped_mean(centred**4)
    flat_cell = m2 <= 1e-12 * np.maximum(1.0, mean**2)
    safe = np.where(flat_cell, 1.0, m2)
    skew = np.where(flat_cell, 0.0, m3 / safe**1.5)
    kurt = np.where(flat_cell, 0.0, m4 / safe**2 - 3.0)

    zyx = np.unravel_index(order, labels.shape)
    out = {
        "cell_id": ids.astype(np.int64),
        "volume": n,
        "centroid_z": grouped_mean(zyx[0].astype(np.float64)),
        "centroid_y": grouped_mean(zyx[1].astype(np.float64)),
        "centroid_x": grouped_mean(zyx[2].astype(np.float64)),
        "mean": mean,
        "std": np.sqrt(m2),
        "min": np.minimum.reduceat(vals, starts),
        "max": np.maximum.reduceat(vals, starts),
    }
    segments = np.split(vals, starts[1:])
    pct = np.array([np.percentile(s, PERCENTILES) for s in segments])
    for k, q in enumerate(PERCENTILES):
        out[f"p{q}"] = pct[:, k]
    out["iqr"] = out["p75"] - out["p25"]
    out["skewness"] = skew
    out["kurtosis"] = kurt

    grad = np.sqrt(sum(ndi.sobel(image, axis=a, mode="nearest") ** 2 for a in range(3)))
    g = grad.ravel()[order]
    g_mean = grouped_mean(g)
    out["gradient_mean"] = g_mean
    out["gradient_std"] = np.sqrt(grouped_mean((g - np.repeat(g_mean, counts)) ** 2))
    lap = ndi.laplace(image, mode="nearest").ravel()[order]
    lap_mean = grouped_mean(lap)
    out["laplacian_var"] = grouped_mean((lap - np.repeat(lap_mean, counts)) ** 2)

    boxes = ndi.find_objects(labels)
    texture, area = [], []
    for cell_id, zc in zip(ids, np.rint(out["centroid_z"]).astype(int), strict=True):
        box = boxes[int(cell_id) - 1]
        mask = labels[zc][box[1:]] == cell_id
        area.append(float(mask.sum()))
        texture.append(glcm_features(image[zc][box[1:]], mask))
    out["area"] = np.asarray(area)
    for name in TEXTURE_FEATURES:
        out[name] = np.array([t[name] for t in texture])
    return pd.DataFrame(out, columns=columns)
