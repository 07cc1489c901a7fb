"""Closed-form Tikhonov inverse of the thin-3D model (2D absorption + phase from Z planes).

Per spatial frequency the forward model is ``y = Mᵀ x`` with ``M = [Hu; Hp]`` (2 × Z) and
``x = (absorption, phase)``. waveorder builds its filter from an SVD of M,
``U S/(S²+λ) Vh = (M Mᴴ + λI)⁻¹ M``; here the same matrix comes from the analytic inverse of
the 2×2 Hermitian ``G = M Mᴴ + λI`` (three Z-sums and a determinant, no SVD).

Convention (verified numerically in tests/test_reconstruct_optics.py). The Tikhonov solution
of ``y = Mᵀ x`` is ``x = (M̄ Mᵀ + λI)⁻¹ M̄ y`` — the *conjugate* of waveorder's filter. TFs
are Hermitian in u (real objects, real data), so conjugating a filter mirrors it (u → −u),
and mirroring a tilted TF is the TF at azimuth + π. Hence waveorder's reconstruction at
(zenith, azimuth) equals the exact inverse at (zenith, azimuth + π); untilted the two are
identical. vsbench's default is ``convention="exact"``: data simulated with waveorder's
``apply_transfer_function`` at azimuth φ is reconstructed best at φ, so a tilt search
recovers φ, not φ + π; it is also the convention of waveorder's own ``phase_thick_3d``
inverse (``conj(H)/(|H|²+λ)``) used for Phase3D, so 2D and 3D agree on the azimuth.
``convention="waveorder"`` gives waveorder's isotropic_thin_3d filter (parity tests).
"""

from __future__ import annotations

CONVENTIONS = ("exact", "waveorder")


def tikhonov_filter(absorption_tf, phase_tf, regularization: float = 1e-3, convention="exact"):
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
        return torch.conj(filt) if convention == "exact" else filt
    # no autograd: write both rows in place (saves the stack copy and temporaries)
    filt = torch.empty((*hu.shape[:-3], 2, *hu.shape[-3:]), dtype=hu.dtype, device=hu.device)
    w_abs, w_phase = filt.unbind(dim=-4)
    torch.mul(hu, c_uu, out=w_abs)
    w_abs.sub_(c_up * hp)
    torch.mul(hp, c_pp, out=w_phase)
    w_phase.sub_(torch.conj(c_up) * hu)
    return torch.conj_physical_(filt) if convention == "exact" else filt


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


def apply_filter(zyx, filt, real_fft: bool = True):
    """Absorption and phase (…, Y, X) from raw intensities (…, Z, Y, X) and a filter.

    The data are intensity-normalised here (as waveorder does). ``filt`` is (2, Z, Y, X) or
    (B, 2, Z, Y, X) with the data (Z, Y, X) or (B, Z, Y, X). ``real_fft`` uses rfft2/irfft2
    (half the work) and still gives waveorder's ``Re(ifft2)``: ``Re`` keeps the filter's
    Hermitian part, which differs from the filter only on the Nyquist row/column of even grids
    (the cropped TFs have no +Nyquist partner), so only those are symmetrised.
    """
    import torch

    y = normalize_intensity(zyx.to(torch.float32))
    ny, nx = y.shape[-2:]
    if real_fft:
        spec = torch.fft.rfft2(y)  # (…, Z, Y, X//2+1)
        f = _hermitian_half(filt)
        out = torch.fft.irfft2((f * spec.unsqueeze(-4)).sum(dim=-3), s=(ny, nx))
    else:
        spec = torch.fft.fft2(y)
        out = torch.fft.ifft2((filt * spec.unsqueeze(-4)).sum(dim=-3)).real
    return out[..., 0, :, :], out[..., 1, :, :]


def reconstruct_thin(
    zyx,
    tilt_optics,
    z_positions,
    regularization: float = 1e-3,
    convention: str = "exact",
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
    filt = tikhonov_filter(hu, hp, regularization, convention)
    return apply_filter(data, filt, real_fft)
