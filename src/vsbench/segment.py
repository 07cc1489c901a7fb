"""Segmentation: cell instance labels, and target masks for GT and prediction alike.

Every function works on one (Z, Y, X) volume. Images are first clipped to
their p1–p99 (or to given limits, e.g. the FOV's over all timepoints) and
scaled to [0, 1], so that a ground truth and a prediction on different
intensity scales go through exactly the same thresholds.

Conventions:
- `spacing` is the physical (z, y, x) voxel size; distances (`h_um`,
  `expand_um`) are in the same unit (µm). Smoothing `sigma` is in YX pixels;
  along Z it is scaled by the pixel-size ratio so the smoothing is isotropic
  in physical space.
- thresholds: "otsu" (on the smoothed, scaled volume) or a number in [0, 1]
  on that same scale; for the ridge method the number applies to the Sato
  response of the [0, 1] image (a bright line of contrast c on a dark
  background answers about 0.4·c at its own scale, see `ridge_response`).
- labels are int32, 0 = background; binary masks are int32 0/1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHODS = ("instance", "ridge", "threshold")
Spacing = Sequence[float]


# --------------------------------------------------------------------------- intensity


def percentile_limits(x: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """p1 and p99 of an array (any shape): the clipping limits used everywhere."""
    lo, hi = np.percentile(np.asarray(x, dtype=np.float32), [low, high])
    return float(lo), float(hi)


def scale_unit(x: np.ndarray, limits: tuple[float, float] | None = None) -> np.ndarray:
    """Clip to `limits` (default: the array's own p1–p99) and scale to [0, 1], float32.

    A volume with no dynamic range (hi <= lo) maps to all zeros: nothing in it
    can pass a threshold, which is the honest answer for a blank prediction.
    """
    x = np.asarray(x, dtype=np.float32)
    lo, hi = percentile_limits(x) if limits is None else limits
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros_like(x)
    out = (np.clip(x, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)


def smooth(x: np.ndarray, sigma: float, spacing: Spacing = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Gaussian smoothing with sigma in YX pixels, scaled along Z for isotropy in µm."""
    from scipy import ndimage as ndi

    if sigma <= 0:
        return np.asarray(x, dtype=np.float32)
    dz, dy, dx = (float(s) for s in spacing)
    sigmas = (sigma * min(dy, dx) / dz, sigma * min(dy, dx) / dy, sigma * min(dy, dx) / dx)
    return ndi.gaussian_filter(np.asarray(x, dtype=np.float32), sigmas, mode="nearest")


def threshold_value(x: np.ndarray, threshold: str | float) -> float:
    """Otsu's threshold of `x`, or the given number; +inf for a constant volume."""
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number in [0, 1], got {threshold!r}")
        from skimage.filters import threshold_otsu

        if float(np.max(x)) <= float(np.min(x)):
            return float("inf")
        return float(threshold_otsu(x))
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be 'otsu' or a number in [0, 1], got {threshold!r}")
    return value


# --------------------------------------------------------------------------- masks and labels


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects with fewer than `min_size` voxels (bool → labelled by 3D 6-connectivity)."""
    from scipy import ndimage as ndi

    if labels.dtype == bool:
        labels, _ = ndi.label(labels)
    labels = np.asarray(labels, dtype=np.int32)
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels = labels.copy()
    labels[small[labels]] = 0
    return labels


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..n in order of first appearance of each sorted old id."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]


def split_instances(foreground: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0), h_um: float = 1.0):
    """Distance-transform watershed: one label per blob, touching blobs split.

    Seeds are the h-maxima of the Euclidean distance map (in µm): a maximum
    must stand `h_um` above the saddle joining it to a neighbour to become its
    own object, which keeps ragged or flattened blobs whole while splitting
    two round nuclei that merely touch. A blob whose whole distance map stays
    below `h_um` still gets one seed, so no foreground component is lost.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    fg = np.asarray(foreground, dtype=bool)
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)
    components, n = ndi.label(fg)
    dist = ndi.distance_transform_edt(fg, sampling=tuple(float(s) for s in spacing))
    seeds, _ = ndi.label(h_maxima(dist, h_um).astype(bool), structure=np.ones((3, 3, 3)))
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[np.unique(components[seeds > 0])] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        peaks = ndi.maximum_position(dist, components, missing)
        base = int(seeds.max())
        for k, p in enumerate(peaks):
            seeds[p] = base + k + 1
    labels = watershed(-dist, seeds, mask=fg)
    return relabel(labels)


def segment_nuclei(
    nucleus: np.ndarray,
    spacing: Spacing = (1.0, 1.0, 1.0),
    sigma: float = 1.0,
    threshold: str | float = "otsu",
    min_size: int = 30,
    h_um: float = 1.0,
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """Nucleus instances: scale, smooth, threshold, fill, size filter, distance watershed."""
    from scipy import ndimage as ndi

    img = smooth(scale_unit(nucleus, limits), sigma, spacing)
    fg = img > threshold_value(img, threshold)
    fg = ndi.binary_fill_holes(fg)
    fg = remove_small(fg, min_size) > 0
    labels = split_instances(fg, spacing, h_um)
    return relabel(remove_small(labels, min_size))


def fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """3D hole filling plus 2D filling per z slice (a cell shell is rarely closed in 3D)."""
    from scipy import ndimage as ndi

    out = ndi.binary_fill_holes(mask)
    for z in range(out.shape[0]):
        out[z] = ndi.binary_fill_holes(out[z])
    return out


def segment_cells(
    nuclei: np.ndarray,
    membrane: np.ndarray | None = None,
    spacing: Spacing = (1.0, 1.0, 1.0),
    sigma: float = 1.0,
    threshold: str | float = "otsu",
    expand_um: float = 3.0,
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """Whole-cell instances that keep their nucleus's id.

    With a membrane channel: the foreground is the thresholded membrane signal
    with its enclosed interiors filled (plus the nuclei), and a watershed on
    the membrane intensity, seeded by the nuclei, puts the boundary between
    neighbours on the membrane ridge. Foreground not connected to a nucleus
    stays background. Without one: each nucleus grows by `expand_um` (µm),
    never into a neighbour (skimage.segmentation.expand_labels).
    """
    from skimage.segmentation import expand_labels, watershed

    nuclei = np.asarray(nuclei, dtype=np.int32)
    if membrane is None:
        grown = expand_labels(nuclei, distance=expand_um, spacing=tuple(spacing))
        return grown.astype(np.int32)
    img = smooth(scale_unit(membrane, limits), sigma, spacing)
    fg = fill_holes_slicewise(img > threshold_value(img, threshold)) | (nuclei > 0)
    cells = watershed(img, markers=nuclei, mask=fg)
    return cells.astype(np.int32)


def ridge_response(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Slice-wise 2D Sato vesselness of bright ridges (sec61b/tomm20-style filament filter).

    Slice-wise because Z sampling is several times coarser than YX: thin ER
    sheets and tubules are only resolved in-plane. The scale is clamped to
    >= 0.5 px (Sato needs a positive scale).
    """
    from skimage.filters import sato

    img = np.asarray(image, dtype=np.float32)
    s = max(float(sigma), 0.5)
    out = np.empty_like(img)
    for z in range(img.shape[0]):
        out[z] = sato(img[z], sigmas=[s], black_ridges=False, mode="reflect")
    return out


def segment_target(
    image: np.ndarray,
    method: str = "threshold",
    sigma: float = 1.0,
    threshold: str | float = "otsu",
    min_size: int = 10,
    spacing: Spacing = (1.0, 1.0, 1.0),
    limits: tuple[float, float] | None = None,
    h_um: float = 1.0,
) -> np.ndarray:
    """Mask of one target channel, the same function for ground truth and prediction.

    instance: nucleus-style instances (labels); ridge: Sato vesselness +
    threshold + size filter (0/1); threshold: smoothing + threshold + size filter (0/1).
    """
    if method not in METHODS:
        raise ValueError(f"segmentation method must be one of {METHODS}, got {method!r}")
    if method == "instance":
        return segment_nuclei(image, spacing, sigma, threshold, min_size, h_um, limits)
    img = scale_unit(image, limits)
    if method == "ridge":
        response = ridge_response(img, sigma)
    else:
        response = smooth(img, sigma, spacing)
    fg = response > threshold_value(response, threshold)
    return (remove_small(fg, min_size) > 0).astype(np.int32)
