"""One position's reconstruction: subtiles → initial values → tilt/focus fit → blended phase.

Per timepoint the FOV is cut into overlapping subtiles (:mod:`vsbench.tiling`); all subtiles
are fitted in one batch (:func:`~vsbench.reconstruct.optimize.optimize_tilt`). Where the
initial values come from, in order of precedence:

1. ``t_cache`` (t > 0): the parameters fitted at the previous timepoint of this position —
   ``skip`` reuses them verbatim (rows flagged ``skipped``; their loss is still evaluated, so
   drift shows up), ``refine`` starts from them with ``t_cache_iterations`` iterations,
   ``off`` fits every timepoint afresh;
2. a warm start (the plate map's value at this position, :mod:`~vsbench.reconstruct.warmstart`);
   with ``skip_if_warmstart`` it is returned verbatim (``skipped``);
3. ``init_mode``: ``grid`` (the best of a coarse zenith × azimuth grid, per subtile) or
   ``value`` (the configured initial values).

``radial_blend_zenith_init`` scales a warm-start or configured initial zenith by r/r_max.
Positions beyond ``edge_threshold`` (r/r_max; the meniscus edge, where the tilt changes
fastest) are never skipped and use ``edge_lr`` (all unknowns free by default).

A subtile with little structure (background, few cells) gives a flat loss and an arbitrary
fit — often the azimuth + π branch. Such outliers are caught against the FOV's other
subtiles: a subtile whose tilt vector ``zenith·(cos, sin)(azimuth)`` lies farther than
``outlier_tolerance`` (rad) from the median tilt vector of the timepoint's subtiles, or whose
focus lies farther than ``outlier_z`` slices from their median, takes the median of the
others (rows flagged ``replaced``); ``outlier_tolerance: null`` turns this off.

The final reconstructions use each subtile's own tilt: Phase3D with waveorder's
``phase_thick_3d`` (it has no focus offset: the 3D inverse is shift-equivariant in z), and,
if asked, the thin 2D phase at (zenith, azimuth, z_offset); both are tent-blended into the
FOV (:func:`vsbench.tiling.blend`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vsbench.io import InputError
from vsbench.reconstruct import FINAL_STEEPNESS, Optics, PhaseReconstructor, check_brightfield
from vsbench.reconstruct.optimize import (
    DEFAULT_LR,
    PARAMETERS,
    OptimizeSettings,
    ThinTiltModel,
    TiltFit,
    grid_candidates,
    grid_search,
    optimize_tilt,
)
from vsbench.reconstruct.warmstart import WARM_START_MODES, is_edge, radial_blend_zenith
from vsbench.tiling import blend, tile_origins

INIT_MODES = ("grid", "value")
T_CACHE_MODES = ("skip", "refine", "off")


@dataclass(frozen=True)
class ReconstructSettings:
    """The config's ``reconstruct`` block as the library uses it (defaults = the schema's)."""

    regularization: float = 1e-3
    z_padding: int = 0
    phase_2d: bool = False
    subtile_size: int = 64
    subtile_overlap: float = 0.5
    context: int = 16
    init_mode: str = "grid"
    initial: Mapping[str, float] = field(
        default_factory=lambda: {"zenith": 0.0, "azimuth": 0.0, "z_offset": 0.0}
    )
    grid_max_zenith: float = 0.3
    grid_n_zenith: int = 4
    grid_n_azimuth: int = 8
    optimize: OptimizeSettings = field(default_factory=OptimizeSettings)
    warm_start_mode: str = "off"
    skip_if_warmstart: bool = False
    radial_blend_zenith_init: bool = False
    edge_threshold: float | None = None
    edge_lr: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    t_cache_mode: str = "skip"
    t_cache_iterations: int = 5
    outlier_tolerance: float | None = 0.08
    outlier_z: float = 1.0

    def __post_init__(self):
        for name, value, allowed in (
            ("init.mode", self.init_mode, INIT_MODES),
            ("warm_start.mode", self.warm_start_mode, WARM_START_MODES),
            ("t_cache.mode", self.t_cache_mode, T_CACHE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"reconstruct.{name} must be one of {allowed}, got {value!r}")
        if self.subtile_size < 8:
            raise ValueError(f"reconstruct.subtile.size must be >= 8, got {self.subtile_size}")

    @classmethod
    def from_config(cls, block: Mapping | None) -> ReconstructSettings:
        b = dict(block or {})
        sub, init = dict(b.get("subtile") or {}), dict(b.get("init") or {})
        warm, cache = dict(b.get("warm_start") or {}), dict(b.get("t_cache") or {})
        d = cls()
        return cls(
            regularization=float(b.get("regularization", d.regularization)),
            z_padding=int(b.get("z_padding", d.z_padding)),
            phase_2d=bool(b.get("phase_2d", d.phase_2d)),
            subtile_size=int(sub.get("size", d.subtile_size)),
            subtile_overlap=float(sub.get("overlap", d.subtile_overlap)),
            context=int(sub.get("context", d.context)),
            init_mode=str(init.get("mode", d.init_mode)),
            initial={p: float(init.get(p, d.initial[p])) for p in PARAMETERS},
            grid_max_zenith=float(init.get("max_zenith", d.grid_max_zenith)),
            grid_n_zenith=int(init.get("n_zenith", d.grid_n_zenith)),
            grid_n_azimuth=int(init.get("n_azimuth", d.grid_n_azimuth)),
            optimize=OptimizeSettings.from_config(b.get("optimize")),
            warm_start_mode=str(warm.get("mode", d.warm_start_mode)),
            skip_if_warmstart=bool(warm.get("skip_if_warmstart", d.skip_if_warmstart)),
            radial_blend_zenith_init=bool(
                warm.get("radial_blend_zenith_init", d.radial_blend_zenith_init)
            ),
            edge_threshold=warm.get("edge_threshold", d.edge_threshold),
            edge_lr={**DEFAULT_LR, **dict(warm.get("edge_lr") or {})},
            t_cache_mode=str(cache.get("mode", d.t_cache_mode)),
            t_cache_iterations=int(cache.get("max_iterations", d.t_cache_iterations)),
            outlier_tolerance=sub.get("outlier_tolerance", d.outlier_tolerance),
            outlier_z=float(sub.get("outlier_z", d.outlier_z)),
        )


@dataclass
class TimepointFit:
    """The fit of one timepoint's subtiles, and where its initial values came from."""

    origins: list[tuple[int, int]]
    tile_shape: tuple[int, int]
    fit: TiltFit
    source: str
    replaced: np.ndarray  # (B,) bool: outlier subtiles that took the median of the others


def replace_outliers(fit: TiltFit, tolerance: float | None, z_tolerance: float) -> np.ndarray:
    """Outlier subtiles (see the module docstring) take the median of the inliers, in place."""
    n = len(fit)
    out = np.zeros(n, bool)
    if tolerance is None or n < 3:
        return out
    vx, vy = fit.zenith * np.cos(fit.azimuth), fit.zenith * np.sin(fit.azimuth)
    mx, my, mz = np.median(vx), np.median(vy), np.median(fit.z_offset)
    out = (np.hypot(vx - mx, vy - my) > tolerance) | (np.abs(fit.z_offset - mz) > z_tolerance)
    out &= ~fit.skipped
    if out.all() or not out.any():
        return np.zeros(n, bool)
    keep = ~out
    tx, ty = float(np.median(vx[keep])), float(np.median(vy[keep]))
    fit.zenith[out] = math.hypot(tx, ty)
    fit.azimuth[out] = math.atan2(ty, tx) % (2 * math.pi)
    fit.z_offset[out] = float(np.median(fit.z_offset[keep]))
    return out


@dataclass
class PositionResult:
    rows: list[dict[str, Any]]
    phase3d: np.ndarray  # (T, Z, Y, X) float32
    phase2d: np.ndarray | None  # (T, Y, X) float32, if asked
    fits: list[TimepointFit]


def cut_tiles(zyx: np.ndarray, size: int, overlap: float):
    """(origins, (ty, tx), tiles (B, Z, ty, tx)) of one stack."""
    ny, nx = zyx.shape[-2:]
    origins = tile_origins((ny, nx), size, overlap)
    ty, tx = min(size, ny), min(size, nx)
    tiles = np.stack([zyx[..., y : y + ty, x : x + tx] for y, x in origins])
    return origins, (ty, tx), tiles


def fit_timepoint(
    zyx: np.ndarray,
    optics: Optics,
    settings: ReconstructSettings,
    *,
    previous: Mapping[str, np.ndarray] | None = None,
    warm: Mapping[str, float] | None = None,
    r: float | None = None,
    r_max: float | None = None,
    device: str = "cpu",
) -> TimepointFit:
    """Fit all subtiles of one (Z, Y, X) stack (see the module docstring for the recipe)."""
    s = settings
    origins, shape, tiles = cut_tiles(
        np.asarray(zyx, dtype=np.float32), s.subtile_size, s.subtile_overlap
    )
    n = len(origins)
    edge = is_edge(r or 0.0, r_max or 0.0, s.edge_threshold)
    opt = replace(s.optimize, lr=dict(s.edge_lr)) if edge else s.optimize
    model = ThinTiltModel(tiles, optics, opt, device=device)
    skip = np.zeros(n, bool)
    blend_r = s.radial_blend_zenith_init and r is not None and r_max
    if previous is not None and s.t_cache_mode != "off":
        init = {p: np.asarray(previous[p], dtype=np.float64) for p in PARAMETERS}
        source = "t_cache"
        if s.t_cache_mode == "skip" and not edge:
            skip[:] = True
        else:
            opt = replace(opt, max_iterations=s.t_cache_iterations)
    elif warm is not None:
        init = {p: float(warm[p]) for p in PARAMETERS}
        if blend_r:
            init["zenith"] = radial_blend_zenith(init["zenith"], r, r_max)
        source = "warm_start"
        skip[:] = s.skip_if_warmstart and not edge
    else:
        init = dict(s.initial)
        if blend_r:
            init["zenith"] = radial_blend_zenith(init["zenith"], r, r_max)
        source = "value"
        if s.init_mode == "grid":
            g = grid_search(
                model,
                *grid_candidates(s.grid_max_zenith, s.grid_n_zenith, s.grid_n_azimuth),
                z_offset=init["z_offset"],
            )
            init = {p: g[p] for p in PARAMETERS}
            source = "grid"
    fit = optimize_tilt(model, init, opt, skip)
    replaced = replace_outliers(fit, s.outlier_tolerance, s.outlier_z)
    return TimepointFit(
        origins=origins, tile_shape=shape, fit=fit, source=source, replaced=replaced
    )


def _rows(t: int, tf: TimepointFit, edge: bool) -> list[dict[str, Any]]:
    f = tf.fit
    share = f.wall_s / max(len(f), 1)
    return [
        {
            "t": t,
            "subtile": k,
            "y0": y0,
            "x0": x0,
            "zenith": float(f.zenith[k]),
            "azimuth": float(f.azimuth[k]),
            "z_offset": float(f.z_offset[k]),
            "loss": float(f.loss[k]),
            "iterations": int(f.iterations[k]),
            "converged": bool(f.converged[k]),
            "skipped": bool(f.skipped[k]),
            "replaced": bool(tf.replaced[k]),
            "init": tf.source,
            "edge": edge,
            "method": "skip" if f.skipped[k] else f.method,
            "wall_s": share,
        }
        for k, (y0, x0) in enumerate(tf.origins)
    ]


class _Phase3D:
    """Per-subtile Phase3D with the transfer function cached per (tile shape, tilt)."""

    def __init__(self, optics: Optics, settings: ReconstructSettings, device: str):
        self.optics, self.s, self.device = optics, settings, device
        self.cache: dict[tuple, PhaseReconstructor] = {}

    def __call__(self, zyx: np.ndarray, tf: TimepointFit) -> np.ndarray:
        ty, tx = tf.tile_shape
        ny, nx = zyx.shape[-2:]
        m = self.s.context
        out = []
        for (y0, x0), zen, azi in zip(tf.origins, tf.fit.zenith, tf.fit.azimuth, strict=True):
            # reconstruct with `context` pixels of neighbouring data, keep the subtile
            ya, yb = max(y0 - m, 0), min(y0 + ty + m, ny)
            xa, xb = max(x0 - m, 0), min(x0 + tx + m, nx)
            key = (zyx.shape[0], yb - ya, xb - xa, round(float(zen), 6), round(float(azi), 6))
            if key not in self.cache:
                self.cache[key] = PhaseReconstructor(
                    key[:3],
                    self.optics,
                    float(zen),
                    float(azi),
                    self.s.regularization,
                    self.s.z_padding,
                    self.device,
                )
            window = self.cache[key](zyx[:, ya:yb, xa:xb])
            out.append(window[:, y0 - ya : y0 - ya + ty, x0 - xa : x0 - xa + tx])
        return blend(out, tf.origins, zyx.shape[-2:])


def phase_2d(
    zyx: np.ndarray, tf: TimepointFit, optics: Optics, regularization: float, device="cpu"
):
    """Thin 2D phase (Y, X) at each subtile's fitted tilt and focus, blended."""
    import torch

    from vsbench.reconstruct.inverse import apply_filter, tikhonov_filter
    from vsbench.reconstruct.optics import TiltOptics

    ty, tx = tf.tile_shape
    f = tf.fit
    tiles = np.stack([zyx[:, y : y + ty, x : x + tx] for y, x in tf.origins])
    n_z = zyx.shape[0]
    with torch.no_grad():
        t = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)  # noqa: E731
        tilt = TiltOptics(
            (ty, tx),
            optics.yx_pixel_size,
            optics.wavelength_um,
            optics.index_media,
            optics.na_illumination,
            optics.na_detection,
            zenith=t(f.zenith),
            azimuth=t(f.azimuth),
            pupil_steepness=FINAL_STEEPNESS,
            device=device,
        )
        z_index = -np.arange(n_z) + n_z // 2
        z = t((z_index[None, :] + f.z_offset[:, None]) * optics.z_pixel_size)
        hu, hp = tilt.transfer_functions(z)
        _, phase = apply_filter(t(tiles), tikhonov_filter(hu, hp, regularization))
    return blend(list(phase.cpu().numpy()), tf.origins, zyx.shape[-2:])


def reconstruct_position(
    tzyx: np.ndarray,
    optics: Optics,
    settings: ReconstructSettings | None = None,
    *,
    warm: Mapping[str, float] | None = None,
    r: float | None = None,
    r_max: float | None = None,
    where: str = "position",
    device: str = "cpu",
) -> PositionResult:
    """Fit every timepoint of a (T, Z, Y, X) brightfield position and reconstruct its phase."""
    s = settings or ReconstructSettings()
    tzyx = np.asarray(tzyx, dtype=np.float32)
    if tzyx.ndim != 4 or tzyx.shape[0] < 1 or tzyx.shape[1] < 2:
        raise InputError(
            f"{where}: expected (T, Z, Y, X) brightfield with Z >= 2, got {tzyx.shape}"
        )
    if s.warm_start_mode != "off" and warm is None:
        raise InputError(
            f"{where}: warm_start.mode is {s.warm_start_mode!r} but no warm start was given"
        )
    edge = is_edge(r or 0.0, r_max or 0.0, s.edge_threshold)
    phase3d = np.empty(tzyx.shape, dtype=np.float32)
    phase2d = np.empty((tzyx.shape[0], *tzyx.shape[2:]), dtype=np.float32) if s.phase_2d else None
    rows, fits, previous = [], [], None
    recon3d = _Phase3D(optics, s, device)
    for t in range(tzyx.shape[0]):
        zyx = tzyx[t]
        check_brightfield(zyx, f"{where} t={t}")
        tf = fit_timepoint(
            zyx, optics, s, previous=previous, warm=warm, r=r, r_max=r_max, device=device
        )
        previous = tf.fit.params()
        fits.append(tf)
        rows.extend(_rows(t, tf, edge))
        phase3d[t] = recon3d(zyx, tf)
        if phase2d is not None:
            phase2d[t] = phase_2d(zyx, tf, optics, s.regularization, device)
    return PositionResult(rows=rows, phase3d=phase3d, phase2d=phase2d, fits=fits)


def tilt_summary(fits: list[TimepointFit]) -> dict[str, float]:
    """Median over subtiles of the t=0 fit (a position's tilt for plate maps and warm-start fits)."""
    f = fits[0].fit
    tx = float(np.median(f.zenith * np.cos(f.azimuth)))  # median of the tilt vectors' parts
    ty = float(np.median(f.zenith * np.sin(f.azimuth)))
    return {
        "zenith": math.hypot(tx, ty),
        "azimuth": math.atan2(ty, tx) % (2 * math.pi),
        "z_offset": float(np.median(f.z_offset)),
    }
