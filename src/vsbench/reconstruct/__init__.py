"""Reconstruct: per-FOV illumination-tilt estimate, then 3D phase (Phase3D) with waveorder.

Submodules: :mod:`vsbench.reconstruct.optics` (``TiltOptics``, thin-3D transfer functions with
the angle-free tensors cached) and :mod:`vsbench.reconstruct.inverse` (closed-form Tikhonov
inverse, and the conjugation convention); both are re-exported here.

Convention. Tilt angles are waveorder's own: ``tilt_angle_zenith`` (polar angle of the
illumination axis from +z, radians) and ``tilt_angle_azimuth`` (direction of the tilt in
the xy-plane, radians, reported in [0, 2π)), as taken by
``waveorder.models.phase_thick_3d.calculate_transfer_function``. Data simulated with that
function + ``apply_transfer_function`` at (zenith, azimuth) is reconstructed with
``apply_inverse_transfer_function`` of the transfer function at the *same* (zenith, azimuth);
no π offset is applied anywhere. Reconstructing at azimuth + π gives a phase that is
uncorrelated with the truth, and the search recovers the simulated azimuth, not azimuth + π
(both are tested).

Search. The loss is waveorder's "midband power" loss: the negative mid-band Fourier magnitude
of the reconstructed phase (per z-slice 2-D spectrum, radial band at fractions of
2·NA_det/λ, normalised by the band's pixel count, averaged over z). Candidates are scored in
batches (batched transfer functions, one batched inverse): a coarse zenith × azimuth grid,
then `refine_rounds` pattern-search rounds (zenith ± step, azimuth ± step around the best,
steps halved each round). The search runs on one even square crop (the most structured
window of the t=0 stack) with a soft pupil (steepness 100); the final reconstruction uses the
whole FOV and steepness 1e4.

Cost. The transfer functions dominate. The coarse bank depends only on optics, crop shape and
angles, so one :class:`TiltSearch` builds it once for all FOVs of a dataset, and builds it
from few waveorder calls: on an even square grid the TF at a mirrored or quarter-turned
azimuth is the mirrored/transposed array (`SYMMETRIES`; exact except the Nyquist row/column,
which the mid-band loss never reads), so 8 × 12 candidates cost 1 + 7 × 2 calls.

Search regularization. At the reconstruction's Tikhonov strength (1e-3, about 0.06 of the
peak |H|² for the demo optics) the mid-band loss rewards filters that *amplify* the data where
the candidate transfer function is weak, and its minimum drifts to small zeniths (0.1 for a
true 0.25). Near the matched-filter regime (strength ≈ 0.5·max|H|²) the minimum sits within a
few hundredths of a radian of the truth; far above it, zenith is overestimated. The search
therefore uses a strength relative to the peak |H|² of its candidate bank
(`search_regularization`, default 0.5), independent of the final `regularization`.
Remaining bias, measured on the demo simulator's cells: zeniths ≤ 0.2 come out up to ~0.06
low (the loss is flat there); the phase reconstructed with the estimate correlates with the
true phase within 0.01 of the phase reconstructed with the true tilt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vsbench.io import InputError

# re-exported: the thin-3D optics and closed-form inverse (issue 3)
from vsbench.reconstruct.inverse import CONVENTIONS as CONVENTIONS
from vsbench.reconstruct.inverse import apply_filter as apply_filter
from vsbench.reconstruct.inverse import normalize_intensity as normalize_intensity
from vsbench.reconstruct.inverse import reconstruct_thin as reconstruct_thin
from vsbench.reconstruct.inverse import tikhonov_filter as tikhonov_filter
from vsbench.reconstruct.optics import TiltOptics as TiltOptics

SEARCH_STEEPNESS = 100.0
FINAL_STEEPNESS = 1e4
DEFAULT_SEARCH = {
    "regularization": 1e-3,
    "z_padding": 0,
    "max_zenith": 0.35,
    "n_zenith": 8,
    "n_azimuth": 12,
    "loss_band": (0.125, 0.25),
    "search_regularization": 0.5,  # relative to max |H|^2 of the candidate bank
    "search_crop": 64,  # yx size of the search window (whole FOV when smaller)
    "refine_rounds": 2,
    "batch_size": 8,  # candidates per transfer-function batch (bounds memory)
}


@dataclass(frozen=True)
class Optics:
    """Microscope optics in micrometres, as the dataset manifest gives them."""

    wavelength_um: float
    na_detection: float
    na_illumination: float
    index_media: float
    pixel_size_zyx: tuple[float, float, float]

    @property
    def z_pixel_size(self) -> float:
        return self.pixel_size_zyx[0]

    @property
    def yx_pixel_size(self) -> float:
        return self.pixel_size_zyx[1]

    @classmethod
    def from_manifest(cls, manifest: Mapping, where: str = "dataset manifest") -> Optics:
        try:
            o = manifest["optics"]
            px = o["pixel_size_um"]
            optics = cls(
                wavelength_um=float(o["wavelength_um"]),
                na_detection=float(o["na_detection"]),
                na_illumination=float(o["na_illumination"]),
                index_media=float(o["index_media"]),
                pixel_size_zyx=(float(px["z"]), float(px["y"]), float(px["x"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: optics incomplete or invalid ({exc!r})") from exc
        _, py, px_ = optics.pixel_size_zyx
        if not math.isclose(py, px_, rel_tol=1e-6):
            raise InputError(
                f"{where}: optics.pixel_size_um y={py} != x={px_} (square pixels expected)"
            )
        values = (
            optics.wavelength_um,
            optics.na_detection,
            optics.index_media,
            *optics.pixel_size_zyx,
        )
        if min(values) <= 0 or optics.na_illumination < 0:
            raise InputError(f"{where}: optics values must be positive, got {optics}")
        return optics

    def tf_kwargs(self) -> dict[str, float]:
        """Keyword arguments of waveorder's phase_thick_3d transfer function."""
        return {
            "yx_pixel_size": self.yx_pixel_size,
            "z_pixel_size": self.z_pixel_size,
            "wavelength_illumination": self.wavelength_um,
            "index_of_refraction_media": self.index_media,
            "numerical_aperture_illumination": self.na_illumination,
            "numerical_aperture_detection": self.na_detection,
        }


def search_settings(settings: Mapping | None) -> dict[str, Any]:
    """Config `reconstruct` block over the defaults (unknown keys are ignored)."""
    out = dict(DEFAULT_SEARCH)
    out.update({k: v for k, v in dict(settings or {}).items() if k in DEFAULT_SEARCH})
    out["loss_band"] = tuple(float(b) for b in out["loss_band"])
    return out


# --------------------------------------------------------------------------- loss


def midband_mask(yx_shape, yx_pixel_size, wavelength, na_det, band=(0.125, 0.25), device="cpu"):
    """Boolean (Y, X) mask of the radial band, in unshifted FFT order."""
    import torch

    fy = torch.fft.fftfreq(int(yx_shape[0]), d=yx_pixel_size, device=device)
    fx = torch.fft.fftfreq(int(yx_shape[1]), d=yx_pixel_size, device=device)
    frr = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    cutoff = 2.0 * na_det / wavelength
    return (frr > cutoff * band[0]) & (frr < cutoff * band[1])


def midband_loss(phase_bzyx, yx_pixel_size, wavelength, na_det, band=(0.125, 0.25)):
    """Negative mean mid-band Fourier magnitude per batch element: (B, Z, Y, X) → (B,).

    The value of waveorder's ``build_loss_fn(MidbandPowerLossSettings())`` on each element;
    lower means more mid-frequency structure.
    """
    import torch

    mask = midband_mask(
        phase_bzyx.shape[-2:], yx_pixel_size, wavelength, na_det, band, phase_bzyx.device
    )
    magnitude = torch.abs(torch.fft.fft2(phase_bzyx.float(), dim=(-2, -1)))
    band_sum = magnitude[..., mask].sum(dim=-1)  # (B, Z)
    return -band_sum.mean(dim=-1) / max(int(mask.sum()), 1)


# --------------------------------------------------------------------------- helpers


def _as_zyx_tensor(zyx, device):
    import torch

    t = torch.as_tensor(np.asarray(zyx, dtype=np.float32), device=device)
    if t.ndim != 3 or t.shape[0] < 2:
        raise InputError(
            f"expected a (Z, Y, X) brightfield stack with Z >= 2, got {tuple(t.shape)}"
        )
    return t


def check_brightfield(zyx: np.ndarray, where: str) -> None:
    """waveorder normalises by the stack mean: intensities must be finite with a positive mean."""
    if not np.all(np.isfinite(zyx)):
        raise InputError(f"{where}: brightfield has non-finite values (NaN/Inf)")
    mean = float(np.mean(zyx))
    if mean <= 0:
        raise InputError(
            f"{where}: brightfield mean is {mean:g}; expected raw intensities (positive mean)"
        )


def select_crop(zyx: np.ndarray, size: int) -> tuple[int, int, int]:
    """(y0, x0, size) of the most structured yx window: an empty crop has no tilt signal."""
    _, ny, nx = zyx.shape
    size = int(min(size, ny, nx))
    size -= size % 2 if size > 2 else 0  # even square crops let the bank use symmetries
    if size >= ny and size >= nx:
        return 0, 0, size

    def starts(n):
        step = max(1, size // 2)
        s = list(range(0, n - size + 1, step))
        if s[-1] != n - size:
            s.append(n - size)
        return s

    # window variances from integral images of the z-summed x and x², O(ZYX)
    x = np.asarray(zyx, dtype=np.float64)
    x = x / (float(x.mean()) or 1.0)
    integrals = [
        np.pad(np.cumsum(np.cumsum(m.sum(axis=0), axis=0), axis=1), ((1, 0), (1, 0)))
        for m in (x, x * x)
    ]
    ys, xs = np.array(starts(ny)), np.array(starts(nx))

    def window_sum(integral):
        return (
            integral[np.ix_(ys + size, xs + size)]
            - integral[np.ix_(ys, xs + size)]
            - integral[np.ix_(ys + size, xs)]
            + integral[np.ix_(ys, xs)]
        )

    n = x.shape[0] * size * size
    s1, s2 = (window_sum(i) / n for i in integrals)
    iy, ix = np.unravel_index(int(np.argmax(s2 - s1 * s1)), s1.shape)
    return int(ys[iy]), int(xs[ix]), size


def wrap_azimuth(a: float) -> float:
    return float(a % (2 * math.pi))


def _same_angle(a: float, b: float, tol: float = 1e-5) -> bool:
    d = (a - b) % (2 * math.pi)
    return min(d, 2 * math.pi - d) < tol


def _neg(h, dim):
    """h[..., -k, ...] along `dim` (FFT index order): the frequency axis mirrored."""
    import torch

    return torch.roll(torch.flip(h, dims=(dim,)), 1, dims=dim)


def _t(h):
    return h.transpose(-1, -2)


# The dihedral symmetries of a square yx frequency grid, as (azimuth map, TF map): the TF at
# azimuth amap(a) is tfmap(TF at a). Exact on an even square grid except for the Nyquist
# row/column (the sampled +Nyquist frequency does not exist), which the mid-band loss never
# reads; tested against waveorder.
SYMMETRIES = (
    (lambda a: a, lambda h: h),
    (lambda a: -a, lambda h: _neg(h, -2)),
    (lambda a: math.pi - a, lambda h: _neg(h, -1)),
    (lambda a: math.pi + a, lambda h: _neg(_neg(h, -2), -1)),
    (lambda a: math.pi / 2 - a, _t),
    (lambda a: a - math.pi / 2, lambda h: _neg(_t(h), -2)),
    (lambda a: a + math.pi / 2, lambda h: _neg(_t(h), -1)),
    (lambda a: 1.5 * math.pi - a, lambda h: _neg(_neg(_t(h), -2), -1)),
)


# --------------------------------------------------------------------------- search


class TiltSearch:
    """Grid + refinement search of (zenith, azimuth) minimising the mid-band loss.

    Holds the coarse candidate bank per crop shape, so all FOVs of a dataset share it.
    """

    def __init__(self, optics: Optics, settings: Mapping | None = None, device: str = "cpu"):
        self.optics = optics
        self.settings = search_settings(settings)
        self.device = device
        self._banks: dict[tuple[int, int, int], tuple] = {}
        self._best_tf = None  # ((shape, zenith, azimuth), TF) of the last search's estimate

    # transfer functions ---------------------------------------------------------------
    def transfer_functions(self, zyx_shape, zenith, azimuth, steepness=SEARCH_STEEPNESS):
        """Real-potential TFs (B, Z', Y, X) for 1-D angle tensors, in memory-bounded batches."""
        import torch
        from waveorder.models import phase_thick_3d

        out = []
        bs = int(self.settings["batch_size"])
        for k in range(0, len(zenith), bs):
            real_tf, _ = phase_thick_3d.calculate_transfer_function(
                tuple(int(s) for s in zyx_shape),
                z_padding=int(self.settings["z_padding"]),
                tilt_angle_zenith=zenith[k : k + bs],
                tilt_angle_azimuth=azimuth[k : k + bs],
                pupil_steepness=steepness,
                **self.optics.tf_kwargs(),
            )
            out.append(real_tf if real_tf.ndim == 4 else real_tf.unsqueeze(0))
        return torch.cat(out)

    def coarse_grid(self):
        """Zenith grid 0..max_zenith × azimuth grid; zenith 0 appears once (azimuth is moot)."""
        import torch

        s = self.settings
        zeniths = np.linspace(0.0, float(s["max_zenith"]), int(s["n_zenith"]))
        azimuths = np.arange(int(s["n_azimuth"])) * 2 * math.pi / int(s["n_azimuth"])
        cands = [(0.0, 0.0)] if zeniths[0] == 0 else []
        cands += [(float(z), float(a)) for z in zeniths if z > 0 for a in azimuths]
        zen = torch.tensor([c[0] for c in cands], dtype=torch.float32, device=self.device)
        azi = torch.tensor([c[1] for c in cands], dtype=torch.float32, device=self.device)
        return zen, azi

    def bank(self, zyx_shape):
        """(zenith, azimuth, TFs, absolute search regularization) of the coarse grid."""
        key = tuple(int(s) for s in zyx_shape)
        if key not in self._banks:
            zen, azi = self.coarse_grid()
            tfs = self.candidate_tfs(key, zen, azi)
            peak = float((tfs.abs() ** 2).max())
            reg = max(float(self.settings["search_regularization"]) * peak, 1e-12)
            self._banks[key] = (zen, azi, tfs, reg)
        return self._banks[key]

    def candidate_tfs(self, zyx_shape, zen, azi):
        """Search TFs of many candidates from the fewest waveorder calls.

        On an even square grid, candidates that are D4 images of one another (same zenith,
        azimuths related by a mirror or a quarter turn) share one waveorder call.
        """
        import torch

        if zyx_shape[-1] != zyx_shape[-2] or zyx_shape[-1] % 2:
            return self.transfer_functions(zyx_shape, zen, azi)
        plan, bases = [], []  # plan[i] = (index into bases, symmetry index)
        for z, a in zip(zen.tolist(), azi.tolist(), strict=True):
            for b, (bz, ba) in enumerate(bases):
                k = next(
                    (
                        k
                        for k, (amap, _) in enumerate(SYMMETRIES)
                        if bz == z and _same_angle(amap(ba), a)
                    ),
                    None,
                )
                if k is not None:
                    plan.append((b, k))
                    break
            else:
                plan.append((len(bases), 0))
                bases.append((z, a))
        bz = torch.tensor([b[0] for b in bases], dtype=torch.float32, device=self.device)
        ba = torch.tensor([b[1] for b in bases], dtype=torch.float32, device=self.device)
        base_tfs = self.transfer_functions(zyx_shape, bz, ba)
        return torch.stack([SYMMETRIES[k][1](base_tfs[b]) for b, k in plan])

    # evaluation -----------------------------------------------------------------------
    def losses(self, data_1zyx, tfs, reg):
        """Mid-band loss of the reconstruction with each TF: (B,)."""
        import torch
        from waveorder.models import phase_thick_3d

        zero = torch.zeros((), dtype=tfs.dtype, device=tfs.device)
        o = self.optics
        out = []
        bs = int(self.settings["batch_size"])
        for k in range(0, tfs.shape[0], bs):
            phase = phase_thick_3d.apply_inverse_transfer_function(
                data_1zyx,
                tfs[k : k + bs],
                zero,
                int(self.settings["z_padding"]),
                regularization_strength=reg,
            )
            out.append(
                midband_loss(
                    phase.reshape(-1, *phase.shape[-3:]),
                    o.yx_pixel_size,
                    o.wavelength_um,
                    o.na_detection,
                    self.settings["loss_band"],
                )
            )
        return torch.cat(out)

    def _crop(self, zyx, crop):
        y0, x0, size = crop
        data = _as_zyx_tensor(zyx[:, y0 : y0 + size, x0 : x0 + size], self.device)
        return data.unsqueeze(0)

    def _tf(self, zyx_shape, zenith: float, azimuth: float):
        """TF (1, Z, Y, X) of one candidate; the last search's best is reused."""
        import torch

        key = (tuple(int(s) for s in zyx_shape), round(zenith, 6), round(azimuth, 6))
        if self._best_tf is not None and self._best_tf[0] == key:
            return self._best_tf[1]
        ang = torch.tensor([[zenith], [azimuth]], dtype=torch.float32, device=self.device)
        return self.transfer_functions(zyx_shape, ang[0], ang[1])

    def loss_at(self, zyx: np.ndarray, zenith: float, azimuth: float, crop) -> float:
        """Search loss of one tilt on the same crop (checks a reused estimate on later t)."""
        import torch

        with torch.no_grad():
            data = self._crop(zyx, crop)
            _, _, _, reg = self.bank(data.shape[-3:])
            tf = self._tf(data.shape[-3:], float(zenith), float(azimuth))
            return float(self.losses(data, tf, reg)[0])

    def __call__(self, zyx: np.ndarray) -> dict[str, Any]:
        """Estimate the tilt of one (Z, Y, X) brightfield stack."""
        import torch

        t0 = time.perf_counter()
        s = self.settings
        with torch.no_grad():
            crop = select_crop(np.asarray(zyx), int(s["search_crop"]))
            data = self._crop(zyx, crop)
            shape = tuple(data.shape[-3:])
            zen, azi, tfs, reg = self.bank(shape)
            losses = self.losses(data, tfs, reg).cpu().numpy()
            seen = {
                (round(z, 6), round(a, 6)): float(v)
                for z, a, v in zip(zen.tolist(), azi.tolist(), losses, strict=True)
            }
            k = int(np.argmin(losses))
            best = (round(float(zen[k]), 6), round(float(azi[k]), 6), float(losses[k]))
            best_tf = tfs[k : k + 1]

            max_zen = float(s["max_zenith"])
            step_z = max_zen / (int(s["n_zenith"]) - 1) if int(s["n_zenith"]) > 1 else 0.0
            step_a = 2 * math.pi / int(s["n_azimuth"])
            for _ in range(int(s["refine_rounds"]) if step_z > 0 else 0):
                step_z, step_a = step_z / 2, step_a / 2
                cands = [
                    c for c in self._neighbours(best, step_z, step_a, max_zen) if c not in seen
                ]
                if not cands:
                    continue
                cz = torch.tensor([c[0] for c in cands], dtype=torch.float32, device=self.device)
                ca = torch.tensor([c[1] for c in cands], dtype=torch.float32, device=self.device)
                ctfs = self.candidate_tfs(shape, cz, ca)
                vals = self.losses(data, ctfs, reg).cpu().numpy()
                for i, (c, v) in enumerate(zip(cands, vals, strict=True)):
                    seen[c] = float(v)
                    if v < best[2]:
                        best, best_tf = (c[0], c[1], float(v)), ctfs[i : i + 1]
        zenith, azimuth, loss = best
        azimuth = wrap_azimuth(azimuth) if zenith > 0 else 0.0
        self._best_tf = ((shape, round(zenith, 6), round(azimuth, 6)), best_tf)
        return {
            "zenith": zenith,
            "azimuth": azimuth,
            "loss": loss,
            "iterations": len(seen),
            "crop": crop,
            "search_regularization": reg,
            "wall_s": time.perf_counter() - t0,
        }

    def _neighbours(self, best, step_z, step_a, max_zen):
        """Pattern-search stencil: zenith ± step and azimuth ± step around the best."""
        bz, ba, _ = best
        if bz <= 0:  # azimuth undefined at zenith 0: probe every coarse direction
            n = int(self.settings["n_azimuth"])
            out = [(step_z, 2 * math.pi * k / n) for k in range(n)]
        else:
            out = [(bz - step_z, ba), (bz + step_z, ba), (bz, ba - step_a), (bz, ba + step_a)]
            out = [(min(max(z, 0.0), max_zen), a) for z, a in out]
        keys = {(round(z, 6), round(wrap_azimuth(a), 6) if z > 0 else 0.0) for z, a in out}
        return sorted(keys)


def estimate_tilt(
    zyx: np.ndarray,
    optics: Optics,
    settings: Mapping | None = None,
    device: str = "cpu",
    search: TiltSearch | None = None,
) -> dict[str, Any]:
    """Tilt of one (Z, Y, X) stack: dict(zenith, azimuth, loss, iterations, ...)."""
    search = search or TiltSearch(optics, settings, device)
    return search(zyx)


# --------------------------------------------------------------------------- reconstruction


class PhaseReconstructor:
    """Tikhonov 3D phase at one tilt: the transfer function is built once, applied per t."""

    def __init__(
        self,
        zyx_shape,
        optics: Optics,
        zenith: float = 0.0,
        azimuth: float = 0.0,
        regularization: float = 1e-3,
        z_padding: int = 0,
        device: str = "cpu",
    ):
        import torch
        from waveorder.models import phase_thick_3d

        self.zyx_shape = tuple(int(s) for s in zyx_shape)
        if len(self.zyx_shape) != 3 or self.zyx_shape[0] < 2:
            raise InputError(f"expected a (Z, Y, X) shape with Z >= 2, got {self.zyx_shape}")
        self.regularization = float(regularization)
        self.z_padding = int(z_padding)
        self.device = device
        ang = torch.tensor([float(zenith), float(azimuth)], dtype=torch.float32, device=device)
        with torch.no_grad():
            self.real_tf, self.imag_tf = phase_thick_3d.calculate_transfer_function(
                self.zyx_shape,
                z_padding=self.z_padding,
                tilt_angle_zenith=ang[0],
                tilt_angle_azimuth=ang[1],
                pupil_steepness=FINAL_STEEPNESS,
                **optics.tf_kwargs(),
            )

    def __call__(self, zyx: np.ndarray) -> np.ndarray:
        """(Z, Y, X) or (B, Z, Y, X) brightfield → phase of the same shape, float32."""
        import torch
        from waveorder.models import phase_thick_3d

        data = torch.as_tensor(np.asarray(zyx, dtype=np.float32), device=self.device)
        if tuple(data.shape[-3:]) != self.zyx_shape:
            raise InputError(f"expected (Z, Y, X) = {self.zyx_shape}, got {tuple(data.shape)}")
        with torch.no_grad():
            phase = phase_thick_3d.apply_inverse_transfer_function(
                data,
                self.real_tf,
                self.imag_tf,
                self.z_padding,
                regularization_strength=self.regularization,
            )
        return phase.float().cpu().numpy()


def reconstruct_phase(
    tzyx: np.ndarray,
    optics: Optics,
    zenith: float = 0.0,
    azimuth: float = 0.0,
    regularization: float = 1e-3,
    z_padding: int = 0,
    device: str = "cpu",
    batch_size: int = 4,
) -> np.ndarray:
    """3D phase (cycles/voxel) of each timepoint, (T, Z, Y, X) float32, one TF for all t.

    Same computation as ``waveorder.models.phase_thick_3d.reconstruct`` (pupil steepness
    1e4), with the transfer function built once per FOV instead of once per call.
    """
    tzyx = np.asarray(tzyx, dtype=np.float32)
    if tzyx.ndim != 4:
        raise InputError(f"expected a (T, Z, Y, X) brightfield array, got shape {tzyx.shape}")
    recon = PhaseReconstructor(
        tzyx.shape[1:], optics, zenith, azimuth, regularization, z_padding, device
    )
    out = np.empty(tzyx.shape, dtype=np.float32)
    for k in range(0, tzyx.shape[0], batch_size):
        out[k : k + batch_size] = recon(tzyx[k : k + batch_size])
    return out
