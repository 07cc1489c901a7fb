"""Sharpness losses of a reconstructed phase, batched: (B, Y, X) or (B, Z, Y, X) → (B,).

Each equals waveorder's ``waveorder.optim.losses.build_loss_fn`` applied to one batch element
(tested), so a per-tile optimisation sums independent per-tile losses in one forward pass.
Lower is better (image-quality measures are negated). ``midband_power`` is the default: the
negative mean Fourier magnitude in a radial band at fractions of the cutoff 2·NA_det/λ.
"""

from __future__ import annotations

# sharpness losses of the phase image; "residual" (the thin model's data misfit, computed in
# vsbench.reconstruct.optimize from the spectrum and the TFs) is the consistent alternative
SHARPNESS = ("midband_power", "total_variation", "laplacian_variance", "normalized_variance")
LOSSES = (*SHARPNESS, "residual")


def midband_mask(yx_shape, yx_pixel_size, wavelength, na_det, band=(0.125, 0.25), device="cpu"):
    """Boolean (Y, X) mask of the radial band, in unshifted FFT order."""
    import torch

    fy = torch.fft.fftfreq(int(yx_shape[0]), d=yx_pixel_size, device=device)
    fx = torch.fft.fftfreq(int(yx_shape[1]), d=yx_pixel_size, device=device)
    frr = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    cutoff = 2.0 * na_det / wavelength
    return (frr > cutoff * band[0]) & (frr < cutoff * band[1])


def _per_slice(x):
    """(B, Y, X) or (B, Z, Y, X) as (B, Z, Y, X)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"expected (B, Y, X) or (B, Z, Y, X), got shape {tuple(x.shape)}")
    return x


def midband_power(phase, yx_pixel_size, wavelength, na_det, band=(0.125, 0.25)):
    """Negative mid-band Fourier magnitude, normalised by the band's pixel count."""
    import torch

    x = _per_slice(phase).float()
    mask = midband_mask(x.shape[-2:], yx_pixel_size, wavelength, na_det, band, x.device)
    magnitude = torch.abs(torch.fft.fft2(x, dim=(-2, -1)))
    band_sum = magnitude[..., mask].sum(dim=-1)  # (B, Z)
    return -band_sum.mean(dim=-1) / max(int(mask.sum()), 1)


def total_variation(phase, *_):
    """Negative mean absolute finite difference (mean of the y and x terms)."""
    x = _per_slice(phase)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(-2, -1))
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(-2, -1))
    return -((dy + dx) / 2).mean(dim=-1)


def laplacian_variance(phase, *_):
    """Negative variance of the 5-point Laplacian (zero padding), the classic autofocus metric."""
    import torch

    x = _per_slice(phase)
    kernel = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device)
    b, z = x.shape[:2]
    lap = torch.nn.functional.conv2d(
        x.reshape(b * z, 1, *x.shape[-2:]), kernel[None, None], padding=1
    )
    return -lap.reshape(b, z, -1).var(dim=-1).mean(dim=-1)


def normalized_variance(phase, *_):
    """Negative var / mean² per slice."""
    x = _per_slice(phase).flatten(-2)
    return -(x.var(dim=-1) / (x.mean(dim=-1) ** 2 + 1e-12)).mean(dim=-1)


def loss_function(name: str):
    """The loss called as ``f(phase, yx_pixel_size, wavelength, na_det, band)``."""
    functions = {
        "midband_power": midband_power,
        "total_variation": total_variation,
        "laplacian_variance": laplacian_variance,
        "normalized_variance": normalized_variance,
    }
    if name == "residual":
        return None
    if name not in functions:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    return functions[name]
