"""Cached tilt optics for the thin-3D (2D absorption + phase from a z-stack) model.

waveorder's ``isotropic_thin_3d.calculate_transfer_function`` rebuilds the frequency grids,
pupils and illumination on every call, on the CPU unless its inputs say otherwise. During a
tilt optimisation only the angles (and the z positions) change, and between positions only
the angles do; :class:`TiltOptics` keeps the angle-free tensors, rebuilds the tilted
illumination pupil when the angles change, and the propagation for each z list. The result
is the same arithmetic as waveorder (same primitives, same frequencies, same crop), with
these savings: ``H2 = conj(H1(-u))`` instead of a fourth FFT per z; the normalisation
``I0 = Σ S·|D_z|² = Σ S·P⁴`` is z-independent (once per tilt); a z list symmetric about 0
computes only z >= 0 (see :meth:`TiltOptics.transfer_functions`); and ``compact_grid``
replaces waveorder's k-fold upsampled grid by the smallest one with the same frequency step on
which the circular pupil correlation does not wrap at the kept frequencies (20× preset,
256²: 336² instead of 512²). All are equal to waveorder within float32 rounding (tested).
"""

from __future__ import annotations

import math

import numpy as np


def _crop_frequencies(n_big: int, n_small: int) -> list[int]:
    """Signed frequency indices kept by waveorder's ``nd_fourier_central_cuboid`` crop."""
    idx = np.fft.fftshift(np.arange(n_big))
    start = (n_big - n_small) // 2
    kept = np.fft.ifftshift(idx[start : start + n_small])
    return [int(i) if i < (n_big + 1) // 2 else int(i) - n_big for i in kept]


def _fast_size(n: int) -> int:
    """Smallest size >= n whose only prime factors are 2, 3, 5, 7 (fast FFT)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _compact_size(n: int, pixel: float, na_det: float, wavelength: float, steepness: float):
    """Smallest grid (same frequency step 1/(n·pixel)) on which the circular correlation of
    the pupils equals the linear one at every kept output frequency.

    The pupils are negligible (< 1e-8) beyond radius R = NA_det/λ + 18.5/steepness; an output
    u with |u| <= n/2 + 1 steps reads D(f + u) for |f| <= R, which must not wrap onto the
    support: N > 2R + n/2 + 1 (in steps).
    """
    step = 1.0 / (n * pixel)
    radius = math.ceil((na_det / wavelength + 18.5 / steepness) / step) + 1
    return _fast_size(max(n, 2 * radius + n // 2 + 2))


class TiltOptics:
    """Thin-3D transfer functions at fixed optics and YX shape, cached per tilt.

    ``zenith``/``azimuth`` are floats or 0-d tensors (one tilt → TFs ``(Z, Y, X)``) or 1-D
    tensors of length B (one tilt per tile → ``(B, Z, Y, X)``; a length-1 tensor still gives
    a batch of one, unlike waveorder, which squeezes it). Angles may require gradients; the
    TFs are differentiable in them and in the z positions. Tensors are created on ``device``
    (default: the device of a tensor zenith, else CPU); nothing is built on the CPU first.
    """

    def __init__(
        self,
        yx_shape,
        yx_pixel_size: float,
        wavelength: float,
        index_media: float,
        na_illumination: float,
        na_detection: float,
        zenith=0.0,
        azimuth=0.0,
        pupil_steepness: float = 1e4,
        invert_phase_contrast: bool = False,
        device=None,
        compact_grid: bool = True,
    ):
        import torch
        from waveorder import optics, sampling

        if device is None:
            device = zenith.device if isinstance(zenith, torch.Tensor) else "cpu"
        self.device = torch.device(device)
        self.yx_shape = tuple(int(s) for s in yx_shape)
        if len(self.yx_shape) != 2 or min(self.yx_shape) < 1:
            raise ValueError(f"yx_shape must be (Y, X) with positive sizes, got {yx_shape}")
        self.wavelength = float(wavelength)
        self.index_media = float(index_media)
        self.na_detection = float(na_detection)
        self.na_illumination = float(na_illumination)
        self.invert_phase_contrast = bool(invert_phase_contrast)
        nyquist = sampling.transverse_nyquist(
            self.wavelength, self.na_illumination, self.na_detection
        )
        self.factor = int(np.ceil(float(yx_pixel_size) / nyquist))
        waveorder_shape = tuple(s * self.factor for s in self.yx_shape)
        if compact_grid:
            self.big_shape = tuple(
                min(big, _compact_size(n, yx_pixel_size, na_detection, wavelength, pupil_steepness))
                for n, big in zip(self.yx_shape, waveorder_shape, strict=True)
            )
        else:
            self.big_shape = waveorder_shape
        # waveorder clamps NA_ill >= NA_det to 0.9 NA_det (with a warning) to avoid singularities
        na_ill = self.na_illumination
        self.na_illumination_used = (
            0.9 * self.na_detection if na_ill >= self.na_detection else na_ill
        )

        with torch.no_grad():
            # same frequency step as waveorder's grid (1/(n·pixel)), possibly fewer samples
            fy, fx = (
                torch.fft.fftfreq(big, float(yx_pixel_size) * n / big, device=self.device)
                for n, big in zip(self.yx_shape, self.big_shape, strict=True)
            )
            self.fyy, self.fxx = torch.meshgrid(fy, fx, indexing="ij")
            frr = torch.sqrt(self.fyy**2 + self.fxx**2)
            pupil = optics.generate_pupil(
                frr,
                torch.tensor(self.na_detection, dtype=torch.float32, device=self.device),
                self.wavelength,
                steepness=pupil_steepness,
            )
            medium = self.wavelength / self.index_media
            argument = 1 - medium**2 * frr**2
            # the propagation kernel's axial frequency, as in optics.generate_propagation_kernel
            self.kz = torch.sqrt(torch.clamp(argument, min=0.0)) / medium
            self.pupil_sq = pupil * pupil  # D_z = P · (P · exp(i2πz·kz))
            self.pupil_4 = self.pupil_sq * self.pupil_sq
            iy, ix = (
                torch.tensor(_crop_frequencies(big, n), device=self.device) % nb
                for n, big, nb in zip(self.yx_shape, waveorder_shape, self.big_shape, strict=True)
            )
            self._crop = (iy[:, None], ix[None, :])
        self.set_tilt(zenith, azimuth)

    def set_tilt(self, zenith, azimuth) -> TiltOptics:
        """Rebuild only the tilted illumination pupil (and its normalisation)."""
        import torch
        from waveorder import optics

        zen = torch.as_tensor(zenith, dtype=torch.float32, device=self.device)
        azi = torch.as_tensor(azimuth, dtype=torch.float32, device=self.device)
        if zen.ndim > 1 or azi.ndim > 1:
            raise ValueError("zenith/azimuth must be scalars or 1-D (B,) tensors")
        self.batched = zen.ndim == 1 or azi.ndim == 1
        if self.batched:
            zen, azi = torch.broadcast_tensors(zen.reshape(-1), azi.reshape(-1))
            if zen.numel() == 0:
                raise ValueError("empty batch of tilt angles")
            zen, azi = zen[:, None, None], azi[:, None, None]
        self.zenith, self.azimuth = zen, azi
        ill = optics.generate_tilted_pupil(
            self.fxx,
            self.fyy,
            torch.tensor(self.na_illumination_used, dtype=torch.float32, device=self.device),
            self.wavelength,
            self.index_media,
            zen,
            azi,
        )
        self.illumination = ill if self.batched else ill[None]  # (B, Yos, Xos)
        self.inv_norm = 1.0 / (self.illumination * self.pupil_4).sum(dim=(-2, -1))  # (B,)
        # normalisation folded into the source: H1/I0 = ifft2(conj(fft2(S/I0 · D)) · fft2(D))
        self._source = (self.illumination * self.inv_norm[:, None, None])[:, None, :, :, None]
        return self

    def z_positions(self, z_positions):
        """z list as a float tensor on the device: (Z,), or (B, Z) for one list per tile."""
        import torch

        z = torch.as_tensor(z_positions, dtype=torch.float32, device=self.device)
        if z.ndim > 2:
            raise ValueError(f"z positions must be (Z,) or (B, Z), got shape {tuple(z.shape)}")
        z = z.reshape(-1) if z.ndim < 2 else z
        return -z if self.invert_phase_contrast else z

    def transfer_functions(self, z_positions):
        """(absorption TF, phase TF) for a z list, each (Z, Y, X) or (B, Z, Y, X), complex64.

        ``z_positions`` is (Z,) — shared by all tilts — or (B, Z), one list per tile (a per-tile
        focus offset); the latter always gives (B, Z, Y, X), and an unbatched tilt is shared.
        For a shared list symmetric about 0 (the usual centred stack) only z ≥ 0 is computed:
        D₋z = conj(D_z) gives H1₋z = conj(H1_z), hence Hu₋z = conj(Hu_z), Hp₋z = −conj(Hp_z).
        """
        import torch

        z = self.z_positions(z_positions)
        if z.ndim == 2:
            n_tilts = self.illumination.shape[0]
            if n_tilts not in (1, z.shape[0]):
                raise ValueError(f"{z.shape[0]} z lists for {n_tilts} tilts")
            return self._transfer_functions(z)
        values = z.detach().tolist()
        half = [i for i, v in enumerate(values) if v >= 0]
        symmetric = (
            not (z.requires_grad and torch.is_grad_enabled())
            and len(half) < len(values)
            and sorted(values) == sorted(-v for v in values)
        )
        if not symmetric:
            absorption, phase_tf = self._transfer_functions(z)
        else:
            where = {values[i]: k for k, i in enumerate(half)}
            hu, hp = self._transfer_functions(z[half])
            pos = [i for i, v in enumerate(values) if v >= 0]
            neg = [i for i, v in enumerate(values) if v < 0]
            pos_t, neg_t = (torch.tensor(ix, device=self.device) for ix in (pos, neg))
            src_pos = torch.tensor([where[values[i]] for i in pos], device=self.device)
            src_neg = torch.tensor([where[-values[i]] for i in neg], device=self.device)
            absorption = hu.new_empty((hu.shape[0], len(values), *hu.shape[2:]))
            phase_tf = torch.empty_like(absorption)
            absorption[:, pos_t] = hu[:, src_pos]
            phase_tf[:, pos_t] = hp[:, src_pos]
            absorption[:, neg_t] = hu[:, src_neg].conj()
            phase_tf[:, neg_t] = -hp[:, src_neg].conj()
        if not self.batched:
            absorption, phase_tf = absorption[0], phase_tf[0]
        return absorption, phase_tf

    def _transfer_functions(self, z):
        """(B, Z, Y, X) TFs for a (Z,) or (B, Z) z tensor, the waveorder arithmetic."""
        import torch

        angle = (2 * math.pi) * z[..., None, None] * self.kz
        det = torch.polar(self.pupil_sq.expand_as(angle), angle)  # ([B,] Z, Yos, Xos)
        det_hat = torch.fft.fft2(det)
        det_ri = torch.view_as_real(det)
        # S·D as a real product on the (re, im) view: no real → complex promotion of S
        sd = torch.view_as_complex(self._source * (det_ri if z.ndim == 2 else det_ri[None]))
        sd_hat = torch.fft.fft2(sd)  # (B, Z, Yos, Xos)
        h1 = torch.fft.ifft2(torch.conj(sd_hat) * det_hat)
        # H2(u) = conj(H1(-u)): the grid mirrored (flip + roll by one), then the same crop
        h2 = torch.roll(torch.flip(h1, dims=(-2, -1)), (1, 1), dims=(-2, -1)).conj()
        if self.big_shape == self.yx_shape:
            h1_crop, h2_crop = h1, h2
        else:
            h1_crop = h1[..., self._crop[0], self._crop[1]]
            h2_crop = h2[..., self._crop[0], self._crop[1]]
        return h1_crop + h2_crop, (h1_crop - h2_crop) * 1j
