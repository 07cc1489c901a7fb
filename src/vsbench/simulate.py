"""Synthetic demo plates: a cell phantom imaged through waveorder's forward models.

The simulator exists so that every later stage has data with a known answer:
true phase, true illumination tilt, instance labels and organelle masks are
kept beside the "measured" brightfield and fluorescence stacks.

Conventions (the reconstruction stage relies on them)
-----------------------------------------------------
Axes and positions
    Arrays are (T, Z, Y, X); Y is the row axis, X the column axis. A FOV's
    ``position_um = [y, x]`` is its centre relative to the well centre, in µm,
    with the same orientation as the image axes.
FOV layout
    FOV k of n in a well sits at ``r = R * sqrt((k + 0.5) / n)`` and angle
    ``θ = k * golden_angle + well_offset`` (``well_offset`` drawn once per well
    from the manifest seed), i.e. ``x = r cos θ``, ``y = r sin θ``: a sunflower
    pattern that covers centre and edge of the well with any n.
Meniscus tilt
    ``zenith = max_zenith * (r / R)**2`` (radians; 0 at the well centre) and
    ``azimuth = atan2(y, x)``: the tilt points radially outward; the focus sags with
    it, ``z_offset = max_z_offset * (r / R)**2`` slices: cells are centred on slice
    ``Z//2 + z_offset`` (± 0.25), which is the thin-model focus offset of the
    reconstruction (z positions ``(−arange(Z) + Z//2 + z_offset)·dz``). Azimuth is
    measured from +X toward +Y of the image axes, which is exactly waveorder's
    convention (``optics.generate_tilted_pupil``: tilt direction
    ``sin(zenith) * (cos(azimuth), sin(azimuth))`` in ``(f_x, f_y)``).
Brightfield forward model
    ``phase_thick_3d.calculate_transfer_function(..., z_padding=0,
    tilt_angle_zenith=zenith, tilt_angle_azimuth=azimuth)`` and
    ``phase_thick_3d.apply_transfer_function``. Reconstructing with
    ``phase_thick_3d.reconstruct`` / ``apply_inverse_transfer_function`` at the
    *same* (zenith, azimuth) recovers the phase; azimuth + π does not (tested).
    A reconstruction that builds its own inverse must match waveorder's pair.
Phase units
    Cycles per voxel, as waveorder: ``Δn · dz / (λ / n_media)``.
Fluorescence
    Organelle density convolved (FFT, periodic) with waveorder's widefield OTF
    (``isotropic_fluorescent_thick_3d``) at a per-target emission wavelength
    (`EMISSION_UM`; the manifest only gives the illumination wavelength), then
    background + Poisson shot noise + Gaussian read noise.

Everything is deterministic from the manifest seed and the FOV index (its
position in the sorted FOV-name list); phantom and noise draw from separate
streams spawned from ``SeedSequence([seed, index])``, so batching FOVs does not
change the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vsbench.io import InputError

TARGETS = ("nucleus", "er", "mito", "membrane")
TRUTH_CHANNELS = (
    "Phase_true",
    "Cell_labels",
    "Nucleus_labels",
    "ER_mask",
    "Mito_mask",
    "Membrane_mask",
)
CONDITIONS = ("mock", "denv", "zikv")
DEFAULTS = {
    "seed": 0,
    "shape": [16, 128, 128],
    "timepoints": 2,
    "fovs_per_well": 4,
    "well_radius_um": 120.0,
    "max_zenith": 0.3,
    "max_z_offset": 0.0,
}
GOLDEN_ANGLE = float(np.pi * (3.0 - np.sqrt(5.0)))

# Refractive-index contrast to the medium. Nucleus and membrane differ clearly
# from the cytoplasm (learnable from phase); ER and mito are thin, so weaker.
DELTA_N = {"cytoplasm": 0.018, "nucleus": 0.028, "membrane": 0.032, "mito": 0.026, "er": 0.023}
# Typical emission peaks of the usual labels (Hoechst, GFP, mScarlet, far-red membrane dye).
EMISSION_UM = {"nucleus": 0.46, "er": 0.51, "mito": 0.59, "membrane": 0.67}
# Expected photons at unit density (after the OTF), camera background and read noise.
PHOTONS = {"nucleus": 600.0, "er": 1000.0, "mito": 1000.0, "membrane": 800.0}
FLUOR_BACKGROUND = 20.0
READ_NOISE = 2.0
# Brightfield: mean level in ADU, photons per ADU and read noise in ADU. waveorder's
# weak-object model gives ~1e-3 relative contrast for cells at this sampling, so the
# gain makes the *effective* photon count (1e8 per voxel, as if many frames were
# summed) set a typical measured SNR: contrast std / noise std ≈ 4 on the demo.
BF_BRIGHTNESS = 1000.0
BF_GAIN = 1.0e5
BF_READ_NOISE = 0.02

# Cell-type morphology in µm. iPSC: small, round, tall, large nucleus, dense
# colonies. A549: large, elongated, flat, sparse.
CELL_TYPES: dict[str, dict[str, Any]] = {
    "ipsc": {
        "radius_um": (4.5, 6.0),
        "aspect": (0.8, 1.0),
        "half_height_um": (3.5, 4.5),
        "nucleus_fraction": (0.62, 0.72),
        "nucleus_z_fraction": 0.7,
        "cells_per_1000um2": 7.0,
        "colonies": (1, 2),
        "min_separation": 1.4,
    },
    "a549": {
        "radius_um": (7.5, 10.0),
        "aspect": (0.6, 0.85),
        "half_height_um": (2.4, 3.0),
        "nucleus_fraction": (0.45, 0.55),
        "nucleus_z_fraction": 0.8,
        "cells_per_1000um2": 2.9,
        "colonies": None,
        "min_separation": 1.7,
    },
}

# Organelle morphology per condition. ER: a band |g| < width of a smooth
# Gaussian field (a thin reticular network in every slice); denv widens the band
# and adds swollen sacs. Mito: tubules per cytoplasm voxel and their length in
# pixels; zikv fragments them into many short puncta.
PHENOTYPES = {
    "mock": {"er_width": 0.24, "er_sacs": False, "mito_per_voxel": 1 / 130, "mito_length": (5, 12)},
    "denv": {"er_width": 0.45, "er_sacs": True, "mito_per_voxel": 1 / 130, "mito_length": (5, 12)},
    "zikv": {"er_width": 0.24, "er_sacs": False, "mito_per_voxel": 1 / 45, "mito_length": (0, 2)},
}


# --------------------------------------------------------------------------- manifest


def resolve_manifest(manifest: Mapping, dataset: str = "dataset") -> dict:
    """The simulate block with defaults filled in, plus optics/channels, checked.

    Returns dict(simulate, optics, brightfield, channels, raw_channels, fovs).
    """
    from vsbench.config import simulated_fov_names

    where = f"dataset {dataset!r}"
    if "simulate" not in manifest:
        raise InputError(f"{where}: manifest has no 'simulate' block")
    sim = {**DEFAULTS, **dict(manifest["simulate"])}
    if sim.get("cell_type") not in CELL_TYPES:
        raise InputError(
            f"{where}: simulate.cell_type {sim.get('cell_type')!r} is unknown "
            f"(expected one of {sorted(CELL_TYPES)})"
        )
    if not sim.get("wells"):
        raise InputError(f"{where}: simulate.wells is empty")
    for well, cond in sim["wells"].items():
        if cond not in CONDITIONS:
            raise InputError(
                f"{where}: simulate.wells[{well!r}] condition {cond!r} is unknown "
                f"(expected one of {list(CONDITIONS)})"
            )
    shape = [int(s) for s in sim["shape"]]
    if len(shape) != 3 or min(shape) < 8:
        raise InputError(f"{where}: simulate.shape must be [Z, Y, X] with each >= 8, got {shape}")
    sim["shape"] = shape
    sim["timepoints"] = int(sim["timepoints"])
    if sim["timepoints"] < 1:
        raise InputError(f"{where}: simulate.timepoints must be >= 1")
    optics = dict(manifest.get("optics") or {})
    for key in ("wavelength_um", "na_detection", "na_illumination", "index_media", "pixel_size_um"):
        if key not in optics:
            raise InputError(f"{where}: optics.{key} is missing")
    px = optics["pixel_size_um"]
    if not np.isclose(float(px["y"]), float(px["x"]), rtol=1e-6):
        raise InputError(
            f"{where}: optics.pixel_size_um y ({px['y']}) and x ({px['x']}) must be equal "
            "(waveorder models square pixels)"
        )
    channels = dict(manifest.get("channels") or {})
    if not channels:
        raise InputError(f"{where}: manifest has no fluorescence channels")
    for channel, target in channels.items():
        if target not in TARGETS:
            raise InputError(
                f"{where}: channels.{channel} maps to target {target!r}, which the simulator "
                f"cannot render (known targets: {list(TARGETS)})"
            )
    brightfield = manifest.get("brightfield", "BF")
    return {
        "simulate": sim,
        "optics": optics,
        "brightfield": brightfield,
        "channels": channels,
        "raw_channels": [brightfield, *channels],
        "fovs": simulated_fov_names(sim),
    }


def pixel_size_zyx(optics: Mapping) -> tuple[float, float, float]:
    px = optics["pixel_size_um"]
    return float(px["z"]), float(px["y"]), float(px["x"])


# --------------------------------------------------------------------------- layout


def fov_layout(simulate: Mapping) -> list[dict]:
    """FOV centres in their well and the meniscus tilt there (see module docstring).

    One dict per FOV in sorted-name order: fov, index, well, condition,
    position_um [y, x], radius_um, zenith, azimuth, z_offset.
    """
    from vsbench.config import simulated_fov_names

    sim = {**DEFAULTS, **dict(simulate)}
    n = int(sim["fovs_per_well"])
    radius = float(sim["well_radius_um"])
    max_zenith = float(sim["max_zenith"])
    max_z_offset = float(sim["max_z_offset"])
    seed = int(sim["seed"])
    wells = sorted(sim["wells"])
    by_name = {}
    for w, well in enumerate(wells):
        offset = np.random.default_rng([seed, 7, w]).uniform(0.0, 2.0 * np.pi)
        for k in range(n):
            r = radius * np.sqrt((k + 0.5) / n)
            theta = k * GOLDEN_ANGLE + offset
            y, x = r * np.sin(theta), r * np.cos(theta)
            by_name[f"{well}/{k}"] = {
                "well": well,
                "condition": sim["wells"][well],
                "position_um": [float(y), float(x)],
                "radius_um": float(r),
                "zenith": float(max_zenith * (r / radius) ** 2),
                "azimuth": float(np.arctan2(y, x)),
                "z_offset": float(max_z_offset * (r / radius) ** 2),
            }
    names = simulated_fov_names(sim)
    return [{"fov": name, "index": i, **by_name[name]} for i, name in enumerate(names)]


def fov_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (phantom, noise) generators for one FOV."""
    phantom, noise = np.random.SeedSequence([int(seed), int(index)]).spawn(2)
    return np.random.default_rng(phantom), np.random.default_rng(noise)


# --------------------------------------------------------------------------- phantom


def _place_cells(rng, extent_um, params) -> np.ndarray:
    """Cell centres (y, x) in µm: colonies (ipsc) or scattered (a549), with a minimum spacing."""
    ey, ex = extent_um
    area = ey * ex
    n_cells = max(
        1, int(round(params["cells_per_1000um2"] * area / 1000.0 * rng.uniform(0.8, 1.2)))
    )
    r_mean = float(np.mean(params["radius_um"]))
    min_dist = params["min_separation"] * r_mean
    if params["colonies"] is not None:
        lo, hi = params["colonies"]
        n_col = int(rng.integers(lo, hi + 1))
        colonies = rng.uniform([0.25 * ey, 0.25 * ex], [0.75 * ey, 0.75 * ex], size=(n_col, 2))
        spread = r_mean * np.sqrt(n_cells / n_col) * 0.9
    centres: list[np.ndarray] = []
    for _ in range(60 * n_cells):
        if len(centres) == n_cells:
            break
        if params["colonies"] is not None:
            c = colonies[int(rng.integers(len(colonies)))] + rng.normal(0.0, spread, 2)
        else:
            c = rng.uniform([0.0, 0.0], [ey, ex])
        if not (0 <= c[0] < ey and 0 <= c[1] < ex):
            continue
        if all(np.hypot(*(c - o)) >= min_dist for o in centres):
            centres.append(c)
    return np.array(centres, dtype=float).reshape(-1, 2)


def _drifts(rng, n_cells: int, timepoints: int) -> np.ndarray:
    """Integer (dy, dx) pixel offset per cell and timepoint: a random walk, 1–2 px per step."""
    out = np.zeros((n_cells, timepoints, 2), dtype=int)
    for t in range(1, timepoints):
        step = rng.uniform(1.0, 2.0, n_cells)
        angle = rng.uniform(0.0, 2.0 * np.pi, n_cells)
        move = np.rint(np.stack([step * np.sin(angle), step * np.cos(angle)], axis=1)).astype(int)
        out[:, t] = out[:, t - 1] + move
    return out


def _smooth_field(rng, shape, sigma) -> np.ndarray:
    from scipy import ndimage as ndi

    g = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (g - g.mean()) / max(float(g.std()), 1e-12)


def _boundary_xy(labels: np.ndarray, width: int) -> np.ndarray:
    """Voxels of a cell within `width` px (in-plane) of another label or the background."""
    out = np.zeros(labels.shape, dtype=bool)
    for s in range(1, width + 1):
        for axis in (1, 2):
            a = [slice(None)] * 3
            b = [slice(None)] * 3
            a[axis], b[axis] = slice(s, None), slice(None, -s)
            differ = labels[tuple(a)] != labels[tuple(b)]
            out[tuple(a)] |= differ
            out[tuple(b)] |= differ
    return out & (labels > 0)


def _cell_geometry(rng, centre_yx, shape, pixel_size, params, z_offset=0.0) -> dict:
    z_px = pixel_size[0]
    Z = shape[0]
    radius = rng.uniform(*params["radius_um"])
    aspect = rng.uniform(*params["aspect"])
    half_height = rng.uniform(*params["half_height_um"])
    zc = (Z // 2 + z_offset + rng.uniform(-0.25, 0.25)) * z_px
    angle = rng.uniform(0.0, np.pi)
    frac = rng.uniform(*params["nucleus_fraction"])
    off_angle = rng.uniform(0.0, 2.0 * np.pi)
    off = 0.12 * radius * aspect * np.array([np.sin(off_angle), np.cos(off_angle)])
    return {
        "centre_um": np.array([zc, centre_yx[0], centre_yx[1]]),
        "axes_um": np.array([half_height, radius, radius * aspect]),
        "angle": angle,
        "nucleus_centre_um": np.array([zc, centre_yx[0] + off[0], centre_yx[1] + off[1]]),
        "nucleus_axes_um": np.array(
            [params["nucleus_z_fraction"] * half_height, frac * radius, frac * radius * aspect]
        ),
    }


def _ellipsoid_d2(region, centre_um, axes_um, angle, pixel_size) -> np.ndarray:
    """Squared normalised ellipsoid distance over a pixel region (z0, z1, y0, y1, x0, x1)."""
    z0, z1, y0, y1, x0, x1 = region
    pz, py, px = pixel_size
    z = (np.arange(z0, z1) * pz - centre_um[0])[:, None, None]
    y = (np.arange(y0, y1) * py - centre_um[1])[None, :, None]
    x = (np.arange(x0, x1) * px - centre_um[2])[None, None, :]
    c, s = np.cos(angle), np.sin(angle)
    u = x * c + y * s
    v = -x * s + y * c
    return (z / axes_um[0]) ** 2 + (u / axes_um[1]) ** 2 + (v / axes_um[2]) ** 2


def _region(centre_um, axes_um, shape, pixel_size):
    reach = [axes_um[0], axes_um[1:].max(), axes_um[1:].max()]
    out = []
    for d in range(3):
        lo = int(np.floor((centre_um[d] - reach[d]) / pixel_size[d])) - 1
        hi = int(np.ceil((centre_um[d] + reach[d]) / pixel_size[d])) + 2
        out += [max(lo, 0), min(hi, shape[d])]
    return tuple(out)


def _render_cells(cells, t, shape, pixel_size):
    """Cell and nucleus labels plus the per-voxel nucleus distance at timepoint t."""
    labels = np.zeros(shape, dtype=np.int32)
    best = np.full(shape, np.inf, dtype=np.float32)
    nuc_d = np.full(shape, np.inf, dtype=np.float32)
    regions = []
    for i, cell in enumerate(cells, start=1):
        shift = np.array([0.0, *(cell["drift"][t] * pixel_size[1:])])
        centre = cell["centre_um"] + shift
        region = _region(centre, cell["axes_um"], shape, pixel_size)
        regions.append(region)
        if region[0] >= region[1] or region[2] >= region[3] or region[4] >= region[5]:
            continue
        sl = np.s_[region[0] : region[1], region[2] : region[3], region[4] : region[5]]
        d2 = _ellipsoid_d2(region, centre, cell["axes_um"], cell["angle"], pixel_size)
        win = (d2 < 1.0) & (d2 < best[sl])
        labels[sl][win] = i
        best[sl][win] = d2[win]
        dn = _ellipsoid_d2(
            region,
            cell["nucleus_centre_um"] + shift,
            cell["nucleus_axes_um"],
            cell["angle"],
            pixel_size,
        )
        nuc_d[sl] = np.where(labels[sl] == i, np.sqrt(dn), nuc_d[sl])
    return labels, nuc_d, regions


def _sample_shifted(field_padded, pad, region, drift):
    """A padded field read over `region`, moved by the cell's drift (fields move with cells)."""
    z0, z1, y0, y1, x0, x1 = region
    dy, dx = int(drift[0]), int(drift[1])
    return field_padded[..., z0:z1, y0 - dy + pad : y1 - dy + pad, x0 - dx + pad : x1 - dx + pad]


def _tubules(rng, cyto_coords, n, length_range) -> np.ndarray:
    """Rasterised in-plane line segments starting in the cytoplasm: (N, 3) voxel indices."""
    if n == 0 or len(cyto_coords) == 0:
        return np.zeros((0, 3), dtype=int)
    starts = cyto_coords[rng.integers(len(cyto_coords), size=n)].astype(float)
    angles = rng.uniform(0.0, 2.0 * np.pi, n)
    lengths = rng.uniform(*length_range, n)
    points = []
    for start, a, length in zip(starts, angles, lengths, strict=True):
        s = np.arange(0.0, length + 0.5, 0.5)
        pts = start[None, :] + s[:, None] * np.array([0.0, np.sin(a), np.cos(a)])[None, :]
        points.append(np.rint(pts).astype(int))
    return np.unique(np.concatenate(points), axis=0)


def make_phantom(
    shape: Sequence[int],
    cell_type: str,
    condition: str,
    rng: np.random.Generator,
    pixel_size: Sequence[float],
    timepoints: int = 2,
    z_offset: float = 0.0,
) -> dict[str, np.ndarray]:
    """A (T, Z, Y, X) cell phantom: labels, organelle masks, densities and Δn.

    Keys: cell_labels, nucleus_labels (int32), membrane, nucleus, er, mito
    (bool), density_<target> (float32 fluorophore density), delta_n (float32).
    Cells keep their organelles while drifting 1–2 px per timepoint. The
    membrane is the in-plane outline (1 px each side of a contact), without
    top/bottom caps: at 2 µm z-steps a cap would fill a whole slice.
    """
    from scipy import ndimage as ndi

    if cell_type not in CELL_TYPES:
        raise InputError(
            f"cell_type {cell_type!r} is unknown (expected one of {sorted(CELL_TYPES)})"
        )
    if condition not in PHENOTYPES:
        raise InputError(f"condition {condition!r} is unknown (expected one of {list(CONDITIONS)})")
    shape = tuple(int(s) for s in shape)
    pixel_size = tuple(float(p) for p in pixel_size)
    params, pheno = CELL_TYPES[cell_type], PHENOTYPES[condition]
    T = int(timepoints)

    centres = _place_cells(rng, (shape[1] * pixel_size[1], shape[2] * pixel_size[2]), params)
    cells = [_cell_geometry(rng, c, shape, pixel_size, params, z_offset) for c in centres]
    drifts = _drifts(rng, len(cells), T)
    for cell, drift in zip(cells, drifts, strict=True):
        cell["drift"] = drift
    pad = int(np.abs(drifts).max(initial=0)) + 1
    padded = (shape[0], shape[1] + 2 * pad, shape[2] + 2 * pad)
    er_field = _smooth_field(rng, padded, (0.6, 2.0, 2.0))
    sac_field = _smooth_field(rng, padded, (0.8, 3.0, 3.0))
    texture = _smooth_field(rng, padded, (0.8, 1.5, 1.5))

    keys = ("cell_labels", "nucleus_labels", "membrane", "nucleus", "er", "mito")
    out = {k: [] for k in keys}
    out.update(delta_n=[], density_nucleus=[])
    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    for t in range(T):
        labels, nuc_d, regions = _render_cells(cells, t, shape, pixel_size)
        membrane = _boundary_xy(labels, 1)
        nucleus = (nuc_d < 1.0) & (labels > 0) & ~membrane
        cyto = (labels > 0) & ~nucleus & ~membrane

        er = np.zeros(shape, dtype=bool)
        tex = np.zeros(shape, dtype=np.float32)
        for i, (cell, region) in enumerate(zip(cells, regions, strict=True), start=1):
            if region[0] >= region[1] or region[2] >= region[3] or region[4] >= region[5]:
                continue
            sl = np.s_[region[0] : region[1], region[2] : region[3], region[4] : region[5]]
            own = labels[sl] == i
            g, sac, tx = (
                _sample_shifted(f, pad, region, cell["drift"][t])
                for f in (er_field, sac_field, texture)
            )
            # perinuclear: the band narrows with distance from the nuclear envelope
            width = pheno["er_width"] * np.exp(-np.clip(nuc_d[sl] - 1.0, 0.0, None) / 1.5)
            cell_er = np.abs(g) < width
            if pheno["er_sacs"]:
                cell_er |= (sac > 1.6) & (nuc_d[sl] < 2.2)
            er[sl] |= cell_er & own & cyto[sl]
            tex[sl] = np.where(own, tx, tex[sl])

        if t == 0:  # tubules are drawn once, in each cell's t = 0 cytoplasm, then move with it
            for i, cell in enumerate(cells, start=1):
                coords = np.argwhere(cyto & (labels == i))
                n = int(round(len(coords) * pheno["mito_per_voxel"]))
                cell["tubules"] = _tubules(rng, coords, n, pheno["mito_length"])
        mito_seed = np.zeros(shape, dtype=bool)
        for cell in cells:
            pts = cell["tubules"] + np.array([0, *cell["drift"][t]])
            ok = np.all((pts >= 0) & (pts < np.array(shape)), axis=1)
            mito_seed[tuple(pts[ok].T)] = True
        mito = ndi.binary_dilation(mito_seed, structure=cross) & cyto
        er &= ~mito

        delta_n = np.zeros(shape, dtype=np.float32)
        delta_n[cyto] = DELTA_N["cytoplasm"] * (1.0 + 0.08 * tex[cyto])
        delta_n[er] = DELTA_N["er"]
        delta_n[mito] = DELTA_N["mito"]
        delta_n[nucleus] = DELTA_N["nucleus"] * (1.0 + 0.15 * tex[nucleus])
        delta_n[membrane] = DELTA_N["membrane"]

        out["cell_labels"].append(labels)
        out["nucleus_labels"].append(np.where(nucleus, labels, 0).astype(np.int32))
        out["membrane"].append(membrane)
        out["nucleus"].append(nucleus)
        out["er"].append(er)
        out["mito"].append(mito)
        out["delta_n"].append(delta_n)
        out["density_nucleus"].append(
            np.where(nucleus, 0.75 + 0.25 * np.tanh(tex), 0.0).astype(np.float32)
        )
    result = {k: np.stack(v) for k, v in out.items()}
    for target in ("er", "mito", "membrane"):
        result[f"density_{target}"] = result[target].astype(np.float32)
    return result


def phase_cycles(delta_n: np.ndarray, optics: Mapping) -> np.ndarray:
    """Refractive-index contrast → phase in cycles per voxel (waveorder's phase_thick_3d units)."""
    dz = float(optics["pixel_size_um"]["z"])
    wavelength_medium = float(optics["wavelength_um"]) / float(optics["index_media"])
    return (delta_n * (dz / wavelength_medium)).astype(np.float32)


# --------------------------------------------------------------------------- imaging


def camera_noise(
    signal: np.ndarray, rng: np.random.Generator, read_noise: float, gain: float = 1.0
) -> np.ndarray:
    """Poisson shot noise on the expected photons (signal · gain) plus Gaussian read noise, in ADU."""
    photons = rng.poisson(np.clip(signal, 0.0, None).astype(np.float64) * gain)
    return (photons / gain + rng.normal(0.0, read_noise, size=signal.shape)).astype(np.float32)


def brightfield_transfer_function(shape_zyx: Sequence[int], optics: Mapping, zenith, azimuth):
    """waveorder's real-potential transfer function, (B, Z, Y, X), one per (zenith, azimuth)."""
    import torch
    from waveorder.models import phase_thick_3d

    zen = torch.as_tensor(np.atleast_1d(np.asarray(zenith, dtype=np.float32)))
    azi = torch.as_tensor(np.atleast_1d(np.asarray(azimuth, dtype=np.float32)))
    if zen.shape != azi.shape:
        raise ValueError(
            f"zenith {tuple(zen.shape)} and azimuth {tuple(azi.shape)} differ in length"
        )
    pz, py, _ = pixel_size_zyx(optics)
    real_tf, _ = phase_thick_3d.calculate_transfer_function(
        tuple(int(s) for s in shape_zyx),
        py,
        pz,
        float(optics["wavelength_um"]),
        0,
        float(optics["index_media"]),
        float(optics["na_illumination"]),
        float(optics["na_detection"]),
        tilt_angle_zenith=zen if len(zen) > 1 else float(zen[0]),
        tilt_angle_azimuth=azi if len(azi) > 1 else float(azi[0]),
    )
    return real_tf if real_tf.ndim == 4 else real_tf[None]


def _apply_otf(volume: np.ndarray, otf) -> np.ndarray:
    """real(ifftn(fftn(v) · H)) over the last three axes; leading axes are batched."""
    import torch

    v = torch.as_tensor(np.ascontiguousarray(volume, dtype=np.float32), device=otf.device)
    spectrum = torch.fft.fftn(v, dim=(-3, -2, -1))
    return torch.real(torch.fft.ifftn(spectrum * otf, dim=(-3, -2, -1))).cpu().numpy()


def brightfield(
    phase: np.ndarray,
    optics: Mapping,
    zenith: float = 0.0,
    azimuth: float = 0.0,
    rng: np.random.Generator | None = None,
    *,
    transfer_function=None,
    brightness: float = BF_BRIGHTNESS,
    gain: float = BF_GAIN,
    read_noise: float = BF_READ_NOISE,
) -> np.ndarray:
    """Brightfield z-stack(s) of a (..., Z, Y, X) phase through waveorder's tilted forward model.

    Same arithmetic as ``phase_thick_3d.apply_transfer_function`` (I = b + b·real(F⁻¹{F{φ}·H})),
    batched over leading axes. ``rng=None`` gives the noise-free expectation.
    """
    if transfer_function is None:
        transfer_function = brightfield_transfer_function(
            phase.shape[-3:], optics, zenith, azimuth
        )[0]
    signal = _apply_otf(phase, transfer_function) * brightness + brightness
    if rng is None:
        return signal.astype(np.float32)
    return camera_noise(signal, rng, read_noise, gain)


def fluorescence_otf(shape_zyx: Sequence[int], optics: Mapping, emission_um: float):
    """waveorder's widefield fluorescence OTF (normalised to 1 at DC) for the manifest optics."""
    from waveorder.models import isotropic_fluorescent_thick_3d

    pz, py, _ = pixel_size_zyx(optics)
    return isotropic_fluorescent_thick_3d.calculate_transfer_function(
        tuple(int(s) for s in shape_zyx),
        py,
        pz,
        float(emission_um),
        0,
        float(optics["index_media"]),
        float(optics["na_detection"]),
    )


def fluorescence(
    density: np.ndarray,
    optics: Mapping,
    rng: np.random.Generator | None = None,
    *,
    emission_um: float = 0.52,
    otf=None,
    photons: float = 300.0,
    background: float = FLUOR_BACKGROUND,
    read_noise: float = READ_NOISE,
) -> np.ndarray:
    """Widefield fluorescence of a (..., Z, Y, X) density: OTF blur, background, shot + read noise."""
    if otf is None:
        otf = fluorescence_otf(density.shape[-3:], optics, emission_um)
    signal = _apply_otf(density, otf) * photons + background
    if rng is None:
        return signal.astype(np.float32)
    return camera_noise(signal, rng, read_noise)


# --------------------------------------------------------------------------- whole plate


def truth_stack(phantom: Mapping, phase: np.ndarray) -> np.ndarray:
    """(T, 6, Z, Y, X) float32 in TRUTH_CHANNELS order (labels exact as float32)."""
    parts = [
        phase,
        phantom["cell_labels"],
        phantom["nucleus_labels"],
        phantom["er"],
        phantom["mito"],
        phantom["membrane"],
    ]
    return np.stack([np.asarray(p, dtype=np.float32) for p in parts], axis=1)


def simulate_fovs(spec: Mapping, batch: int = 3, device: str = "cpu") -> Iterator[dict]:
    """Simulate every FOV of a resolved manifest (see `resolve_manifest`).

    Yields dict(fov, raw (T, C, Z, Y, X), truth (T, 6, Z, Y, X), attrs) in FOV order.
    Brightfield transfer functions are built `batch` FOVs at a time (one
    waveorder call per batch); memory grows with the batch.
    """
    sim, optics = spec["simulate"], spec["optics"]
    shape = tuple(sim["shape"])
    T = int(sim["timepoints"])
    seed = int(sim["seed"])
    pixel_size = pixel_size_zyx(optics)
    layout = fov_layout(sim)
    otfs = {
        target: fluorescence_otf(shape, optics, EMISSION_UM[target]).to(device)
        for target in dict.fromkeys(spec["channels"].values())
    }
    for start in range(0, len(layout), max(1, int(batch))):
        chunk = layout[start : start + max(1, int(batch))]
        tfs = brightfield_transfer_function(
            shape, optics, [f["zenith"] for f in chunk], [f["azimuth"] for f in chunk]
        ).to(device)
        for fov, tf in zip(chunk, tfs, strict=True):
            phantom_rng, noise_rng = fov_rngs(seed, fov["index"])
            phantom = make_phantom(
                shape,
                sim["cell_type"],
                fov["condition"],
                phantom_rng,
                pixel_size,
                T,
                fov["z_offset"],
            )
            phase = phase_cycles(phantom["delta_n"], optics)
            channels = [brightfield(phase, optics, rng=noise_rng, transfer_function=tf)]
            for target in spec["channels"].values():
                channels.append(
                    fluorescence(
                        phantom[f"density_{target}"],
                        optics,
                        noise_rng,
                        otf=otfs[target],
                        photons=PHOTONS[target],
                    )
                )
            attrs = {
                "zenith": fov["zenith"],
                "azimuth": fov["azimuth"],
                "z_offset": fov["z_offset"],
                "position_um": fov["position_um"],
                "condition": fov["condition"],
                "cell_type": sim["cell_type"],
                "seed": seed,
                "fov_index": fov["index"],
                "n_cells": int(phantom["cell_labels"][0].max()),
            }
            yield {
                "fov": fov["fov"],
                "raw": np.stack(channels, axis=1).astype(np.float32),
                "truth": truth_stack(phantom, phase),
                "attrs": attrs,
            }
