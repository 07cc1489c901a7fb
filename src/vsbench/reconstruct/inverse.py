"""Closed-form Tikhonov inverse of the thin-3D model (2D absorption + phase from Z planes).

Per spatial frequency the forward model is ``y = Mᵀ x`` with ``M = [Hu; Hp]`` (2 × Z) and
``x = (absorption, phase)``. waveorder builds its filter from an SVD of M,
``U S/(S²+λ) Vh = (M Mᴴ + λI)⁻¹ M``; here the same matrix comes from the analytic inverse of
the 2×2 Hermitian ``G = M Mᴴ + λI`` (three Z-sums and a determinant, no SVD).

Convention (verified numerically in tests/test_reconstruct_optics.py and test_reconstruct.py).
Angles mean what waveorder's tilted illumination pupil and its ``phase_thick_3d`` model say
(the demo simulator's forward model and the Phase3D reconstruction); we call this
``"physical"``. waveorder's two brightfield forward models disagree on the azimuth: a thin
sheet imaged by ``phase_thick_3d`` at (zenith, φ) equals ``isotropic_thin_3d``'s forward model
at (zenith, φ + π) (Pearson 0.96, against 0.06 at φ) with its default descending z list
``(−arange(Z) + Z//2 + offset)·dz``. waveorder's thin-3D *inverse* filter
``(M Mᴴ + λI)⁻¹ M`` is the conjugate of the exact Tikhonov pseudo-inverse
``(M̄ Mᵀ + λI)⁻¹ M̄`` of its own thin forward model — and conjugating a filter of Hermitian
TFs mirrors it (u → −u), which is the filter at azimuth + π. The two π offsets cancel: the
filter waveorder uses is the exact inverse of the physical (``phase_thick_3d``) imaging of a
thin object. So:

- ``convention="physical"`` (default) is waveorder's filter. Data of the demo simulator, or of
  ``phase_thick_3d.apply_transfer_function``, at φ is reconstructed best at φ, the tilt
  optimiser recovers φ (not φ + π), and 2D and 3D reconstructions agree on the azimuth.
- ``convention="thin_forward"`` is the exact inverse of ``isotropic_thin_3d``'s forward
  model at the same angles (equal to ``"physical"`` at azimuth + π); for data made with that
  function. Untilted the two coincide.
"""

from __future__ import annotations

CONVENTIONS = ("physical", "thin_forward")


def tikhonov_filter(
    absorption_tf, phase_tf, regularization: float = 1e-3, convention: str = "physical"
):
    """Filter bank (…, 2, Z, Y, X): output channel (absorption, phase) × input plane z.

    TFs are (Z, Y, X) or (B, Z, Y, X); the result has the same leading dims plus the channel
    axis in front of Z. Reconstruction is ``x̂_s = Σ_z W[s, z] · ŷ_z``.
    """
    import torch

    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    hu, hp = absorption_tf, phase_tf
    if hu.shape != hp.shape or hu.ndim < 3:
        raise ValueError(f"TFs must share a (…, Z, Y, X) shape, got {hu.shape} / {hp.shape}")
    lam = float(regularization)
    a = (hu.real**2 + hu.imag**2).sum(dim=-3) + lam  # G00 = Σ|Hu|² + λ
    d = (hp.real**2 + hp.imag**2).sum(dim=-3) + lam  # G11
    b = (hu * torch.conj(hp)).sum(dim=-3)  # G01 = conj(G10)
    inv_det = 1.0 / (a * d - (b.real**2 + b.imag**2))
    # G⁻¹ = [[d, -b], [-b̄, a]] / det, folded into per-frequency coefficients (…, 1, Y, X)
    c_uu = (d * inv_det).unsqueeze(-3).to(hu.dtype)
    c_pp = (a * inv_det).unsqueeze(-3).to(hu.dtype)
    c_up = (b * inv_det).unsqueeze(-3)
    if torch.is_grad_enabled() and (hu.requires_grad or hp.requires_grad):
        filt = torch.stack((c_uu * hu - c_up * hp, c_pp * hp - torch.conj(c_up) * hu), dim=-4)
        return torch.conj(filt) if convention == "thin_forward" else filt
    # no autograd: write both rows in place (saves the stack copy and temporaries)
    filt = torch.empty((*hu.shape[:-3], 2, *hu.shape[-3:]), dtype=hu.dtype, device=hu.device)
    w_abs, w_phase = filt.unbind(dim=-4)
    torch.mul(hu, c_uu, out=w_abs)
    w_abs.sub_(c_up * hp)
    torch.mul(hp, c_pp, out=w_phase)
    w_phase.sub_(torch.conj(c_up) * hu)
    return torch.conj_physical_(filt) if convention == "thin_forward" else filt


def normalize_intensity(zyx):
    """waveorder's ``inten_normalization`` without background filter: I / mean(I) − 1 per plane."""
    import torch

    means = torch.clamp(zyx.mean(dim=(-2, -1), keepdim=True), min=1e-12)
    return zyx / means - 1


def _mirrored(t, dim):
    """t at −k along `dim` (FFT index order)."""
    import torch

    return torch.roll(torch.flip(t, dims=(dim,)), 1, dims=dim)


def _hermitian_half(filt):
    """Columns 0..X//2 of the filter's Hermitian part (F(u) + conj F(−u)) / 2."""
    import torch

    ny, nx = filt.shape[-2:]
    half = filt[..., : nx // 2 + 1]
    if ny % 2 and nx % 2:
        return half
    half = half.clone()
    if ny % 2 == 0:  # Nyquist row: its mirror is itself, with x negated
        row = filt[..., ny // 2, :]
        sym = (row + torch.conj(_mirrored(row, -1))) / 2
        half[..., ny // 2, :] = sym[..., : nx // 2 + 1]
    if nx % 2 == 0:  # Nyquist column, y negated
        col = filt[..., :, nx // 2]
        half[..., :, nx // 2] = (col + torch.conj(_mirrored(col, -1))) / 2
    return half


def half_filter(
    absorption_tf, phase_tf, regularization: float = 1e-3, convention: str = "physical"
):
    """The filter on the rfft half-plane (…, 2, Z, Y, X//2+1), Hermitian part on the Nyquist
    row/column: all a real-FFT reconstruction reads, at half the cost of the full filter.

    Equals ``_hermitian_half(tikhonov_filter(...))``; the Nyquist row's mirror lies outside
    the half, so that one row is computed over the full width.
    """
    import torch

    ny, nx = absorption_tf.shape[-2:]
    xh = nx // 2 + 1
    hu, hp = (tf[..., :xh].contiguous() for tf in (absorption_tf, phase_tf))  # strided is slower
    filt = tikhonov_filter(hu, hp, regularization, convention)
    if ny % 2 == 0:
        r = slice(ny // 2, ny // 2 + 1)
        row = tikhonov_filter(
            absorption_tf[..., r, :], phase_tf[..., r, :], regularization, convention
        )
        row = row[..., 0, :]
        filt[..., ny // 2, :] = ((row + torch.conj(_mirrored(row, -1))) / 2)[..., :xh]
    if nx % 2 == 0:
        col = filt[..., :, nx // 2]
        filt[..., :, nx // 2] = (col + torch.conj(_mirrored(col, -1))) / 2
    return filt


def data_spectrum(zyx):
    """rfft2 of the intensity-normalised stack: computed once when many filters are tried."""
    import torch

    return torch.fft.rfft2(normalize_intensity(zyx.to(torch.float32)))


def filter_spectrum(spec, filt, yx_shape):
    """(…, 2, Y, X) absorption and phase from a ``data_spectrum`` and a full filter
    (…, 2, Z, Y, X) or a ``half_filter`` (…, 2, Z, Y, X//2+1)."""
    import torch

    f = filt if filt.shape[-1] == spec.shape[-1] != yx_shape[-1] else _hermitian_half(filt)
    return torch.fft.irfft2((f * spec.unsqueeze(-4)).sum(dim=-3), s=tuple(yx_shape))


def apply_filter(zyx, filt, real_fft: bool = True):
    """Absorption and phase (…, Y, X) from raw intensities (…, Z, Y, X) and a filter.

    The data are intensity-normalised here (as waveorder does). ``filt`` is (2, Z, Y, X) or
    (B, 2, Z, Y, X) with the data (Z, Y, X) or (B, Z, Y, X). ``real_fft`` uses rfft2/irfft2
    (half the work) and still gives waveorder's ``Re(ifft2)``: ``Re`` keeps the filter's
    Hermitian part, which differs from the filter only on the Nyquist row/column of even grids
    (the cropped TFs have no +Nyquist partner), so only those are symmetrised.
    """
    import torch

    if real_fft:
        out = filter_spectrum(data_spectrum(zyx), filt, zyx.shape[-2:])
    else:
        spec = torch.fft.fft2(normalize_intensity(zyx.to(torch.float32)))
        out = torch.fft.ifft2((filt * spec.unsqueeze(-4)).sum(dim=-3)).real
    return out[..., 0, :, :], out[..., 1, :, :]


def reconstruct_thin(
    zyx,
    tilt_optics,
    z_positions,
    regularization: float = 1e-3,
    convention: str = "physical",
    real_fft: bool = True,
):
    """(absorption, phase) 2D from a (Z, Y, X) or (B, Z, Y, X) stack with cached optics."""
    import torch

    data = torch.as_tensor(zyx, dtype=torch.float32, device=tilt_optics.device)
    if tuple(data.shape[-2:]) != tilt_optics.yx_shape:
        raise ValueError(f"data YX {tuple(data.shape[-2:])} != optics {tilt_optics.yx_shape}")
    hu, hp = tilt_optics.transfer_functions(z_positions)
    if hu.shape[-3] != data.shape[-3]:
        raise ValueError(f"{hu.shape[-3]} z positions for {data.shape[-3]} planes")
    if real_fft:
        out = filter_spectrum(
            data_spectrum(data), half_filter(hu, hp, regularization, convention), data.shape[-2:]
        )
        return out[..., 0, :, :], out[..., 1, :, :]
    return apply_filter(data, tikhonov_filter(hu, hp, regularization, convention), real_fft)
