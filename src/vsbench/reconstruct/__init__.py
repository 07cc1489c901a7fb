"""Reconstruct: per-subtile illumination tilt and focus, then tilt-corrected phase.

Modules:

- :mod:`~vsbench.reconstruct.optics`: ``TiltOptics``, thin-3D transfer functions with the
  angle-free tensors cached, built on the device of the inputs;
- :mod:`~vsbench.reconstruct.inverse`: the closed-form 2×2 Tikhonov inverse (no SVD) and the
  azimuth convention (``"physical"``: angles as waveorder's tilted pupil and ``phase_thick_3d``
  mean them; the demo simulator's azimuth is recovered, not azimuth + π);
- :mod:`~vsbench.reconstruct.losses`: sharpness losses (waveorder parity);
- :mod:`~vsbench.reconstruct.optimize`: batched per-subtile NAdam / LM-damped diagonal Newton
  over (zenith, azimuth, z_offset), and the data-misfit loss ``residual``;
- :mod:`~vsbench.reconstruct.warmstart`: the plate-level meniscus map, radial zenith blend,
  edge override;
- :mod:`~vsbench.reconstruct.position`: one position's whole recipe (subtiles, initial values,
  warm start, T-cache, the final Phase3D / 2D phase blended from per-subtile reconstructions).

This module holds the optics record and the Phase3D primitive (waveorder's ``phase_thick_3d``
at one tilt, the transfer function built once and applied to every timepoint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vsbench.io import InputError

# re-exported: the thin-3D optics and the closed-form inverse
from vsbench.reconstruct.inverse import CONVENTIONS as CONVENTIONS
from vsbench.reconstruct.inverse import apply_filter as apply_filter
from vsbench.reconstruct.inverse import normalize_intensity as normalize_intensity
from vsbench.reconstruct.inverse import reconstruct_thin as reconstruct_thin
from vsbench.reconstruct.inverse import tikhonov_filter as tikhonov_filter
from vsbench.reconstruct.optics import TiltOptics as TiltOptics

FINAL_STEEPNESS = 1e4  # pupil steepness of the final reconstructions (waveorder default)


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


def check_brightfield(zyx: np.ndarray, where: str) -> None:
    """waveorder normalises by the stack mean: intensities must be finite with a positive mean."""
    if not np.all(np.isfinite(zyx)):
        raise InputError(f"{where}: brightfield has non-finite values (NaN/Inf)")
    mean = float(np.mean(zyx))
    if mean <= 0:
        raise InputError(
            f"{where}: brightfield mean is {mean:g}; expected raw intensities (positive mean)"
        )


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
