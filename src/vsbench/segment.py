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
  on that same scale; for nuclei/instances and membranes each z slice's p10
  is subtracted first (`subtract_background`); for the ridge method the
  number applies to the Sato response of the [0, 1] image (a 1–2 px bright
  line of contrast c on a dark background answers roughly 0.3·c at scale 1,
  see `ridge_response`). Otsu suits blob-like targets; for sparse filaments
  (ER, mitochondria) the ridge response has no second mode and Otsu cuts
  into the noise, so use a number there (0.1 on the demo data).
- cell labels are built for monolayers imaged with coarse Z: instances are
  separated in-plane and extended axially (see `segment_nuclei`,
  `segment_cells`).
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
    """Consecutive ids 1..n, keeping the order of the old ids."""
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
    seeds, _ = ndi.label(h_maxima(dist, h_um).astype(bool), structure=np.ones((3,) * fg.ndim))
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


def subtract_background(image: np.ndarray, percentile: float = 10.0) -> np.ndarray:
    """Subtract each z slice's low percentile: widefield out-of-focus haze is a per-slice offset.

    Without this, defocused planes (brighter haze, lower contrast) pass a
    global threshold and blurred neighbours merge through them.
    """
    image = np.asarray(image, dtype=np.float32)
    return image - np.percentile(image, percentile, axis=(-2, -1), keepdims=True)


def segment_nuclei(
    nucleus: np.ndarray,
    spacing: Spacing = (1.0, 1.0, 1.0),
    sigma: float = 1.0,
    threshold: str | float = "otsu",
    min_size: int = 30,
    h_um: float = 1.0,
    limits: tuple[float, float] | None = None,
    split: str = "projection",
    axial_fraction: float = 0.0,
) -> np.ndarray:
    """Nucleus instances: scale, per-slice background, smooth, threshold, distance watershed.

    The 3D foreground is the smoothed volume above the threshold (holes
    filled). split="projection" (default, for monolayers imaged with coarse Z)
    separates touching nuclei in 2D: threshold + distance watershed on the
    maximum-intensity projection, each 2D label then claiming its column of
    the 3D foreground. Axial blur (widefield has no optical sectioning)
    connects neighbours through defocused planes, which defeats a 3D split;
    the projection keeps the in-focus footprints apart. split="3d" runs the
    distance watershed in 3D (µm-scaled), for well-sectioned thick samples.
    """
    from scipy import ndimage as ndi

    if split not in ("projection", "3d"):
        raise ValueError(f"split must be 'projection' or '3d', got {split!r}")
    img = smooth(subtract_background(scale_unit(nucleus, limits)), sigma, spacing)
    fg = ndi.binary_fill_holes(img > threshold_value(img, threshold))
    fg = remove_small(fg, min_size) > 0
    if split == "3d":
        labels = split_instances(fg, spacing, h_um)
    else:
        proj = img.max(axis=0)
        fg2 = ndi.binary_fill_holes(proj > threshold_value(proj, threshold))
        labels = split_instances(fg2, spacing[1:], h_um)[None] * fg
    labels = labels * axial_gate(img, axial_fraction)
    return relabel(remove_small(labels, min_size))


def axial_gate(response: np.ndarray, fraction: float) -> np.ndarray:
    """Voxels at or above `fraction` of their (y, x) column's maximum over Z.

    Widefield fluorescence has no optical sectioning: an object blurs over many more
    slices than it occupies, and a global threshold keeps them all (a nucleus three slices
    thick came out ten slices thick on the demo, so no instance reached IoU 0.5). Keeping
    the in-focus part of each column restores the axial extent; 0 keeps everything.
    """
    if fraction <= 0:
        return np.ones(response.shape, dtype=bool)
    return response >= fraction * response.max(axis=0, keepdims=True)


def z_ranges(labels: np.ndarray) -> np.ndarray:
    """(n + 1, 2) first and last z slice of each label (row 0 and absent labels: empty range)."""
    n = int(labels.max())
    lo = np.full(n + 1, labels.shape[0], dtype=np.int64)
    hi = np.full(n + 1, -1, dtype=np.int64)
    for z in range(labels.shape[0]):
        ids = np.unique(labels[z])
        lo[ids] = np.minimum(lo[ids], z)
        hi[ids] = np.maximum(hi[ids], z)
    lo[0], hi[0] = labels.shape[0], -1
    return np.stack([lo, hi], axis=1)


def segment_cells(
    nuclei: np.ndarray,
    membrane: np.ndarray | None = None,
    spacing: Spacing = (1.0, 1.0, 1.0),
    sigma: float = 1.0,
    threshold: str | float = "otsu",
    expand_um: float = 3.0,
    background_um: float | None = None,
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """Whole-cell instances that keep their nucleus's id.

    In-plane footprint, with a membrane channel: a seeded watershed on the
    maximum over z of the slice-wise ridge response (`ridge_response`) of the
    smoothed, background-subtracted membrane. Each slice shows a membrane as
    a line where it crosses the slice, while flat apical/basal sheets project
    as filled discs in an intensity projection; the ridge projection keeps
    only the outlines, so boundaries fall on the membrane. Seeds are the
    nucleus footprints and one background seed: pixels with a weak ridge
    response farther than `background_um` from every nucleus (default 3x the
    median nucleus equivalent-circle radius, i.e. beyond any plausible
    cell). Flooding gives every region reachable without crossing a membrane
    to the background and each enclosed interior to its nucleus, also for
    cells cut by the FOV border. With no background seed (a confluent field)
    every pixel goes to some cell. Without a membrane channel: each nucleus
    footprint grows by `expand_um`, never into a neighbour
    (skimage.segmentation.expand_labels).
    Axially a cell spans the z slices its nucleus spans: in widefield data a
    membrane's axial profile is dominated by out-of-focus haze, while the
    nucleus is the best-localised structure of a monolayer cell. (Nuclei
    stacked in one column share a footprint; the higher id wins.)
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels, watershed

    nuclei = np.asarray(nuclei, dtype=np.int32)
    yx = tuple(float(s) for s in spacing[1:])
    footprint = nuclei.max(axis=0)
    if footprint.max() == 0:
        return np.zeros(nuclei.shape, dtype=np.int32)
    if membrane is None:
        cells2d = expand_labels(footprint, distance=expand_um, spacing=yx)
    else:
        img = smooth(subtract_background(scale_unit(membrane, limits)), sigma, spacing)
        proj = ridge_response(img, sigma).max(axis=0)
        if background_um is None:
            sizes = np.bincount(footprint.ravel())[1:]
            area = float(np.median(sizes[sizes > 0])) * yx[0] * yx[1]
            background_um = 3.0 * np.sqrt(area / np.pi)
        far = ndi.distance_transform_edt(footprint == 0, sampling=yx) > background_um
        markers = footprint.copy()
        bg_id = int(footprint.max()) + 1
        markers[far & (proj < threshold_value(proj, threshold))] = bg_id
        cells2d = watershed(proj, markers=markers)
        cells2d[cells2d == bg_id] = 0
    ranges = z_ranges(nuclei)
    z = np.arange(nuclei.shape[0])[:, None, None]
    inside = (z >= ranges[cells2d, 0][None]) & (z <= ranges[cells2d, 1][None])
    return np.where(inside, cells2d[None], 0).astype(np.int32)


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
    axial_fraction: float = 0.0,
) -> np.ndarray:
    """Mask of one target channel, the same function for ground truth and prediction.

    instance: nucleus-style instances (labels); ridge: Sato vesselness +
    threshold + size filter (0/1); threshold: smoothing + threshold + size filter (0/1).
    """
    if method not in METHODS:
        raise ValueError(f"segmentation method must be one of {METHODS}, got {method!r}")
    if method == "instance":
        return segment_nuclei(
            image, spacing, sigma, threshold, min_size, h_um, limits, axial_fraction=axial_fraction
        )
    img = scale_unit(image, limits)
    if method == "ridge":
        response = ridge_response(img, sigma)
    else:
        response = smooth(img, sigma, spacing)
    fg = (response > threshold_value(response, threshold)) & axial_gate(response, axial_fraction)
    return (remove_small(fg, min_size) > 0).astype(np.int32)
