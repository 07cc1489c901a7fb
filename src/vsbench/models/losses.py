"""Regression losses by name: mse, l1, and l1_msssim = ½·L1 + ½·(1 − MS-SSIM).

SSIM follows skimage.metrics.structural_similarity with gaussian_weights=True,
sigma 1.5, truncate 3.5 (an 11-tap window), use_sample_covariance=False, K1 .01,
K2 .03, averaged over the 'valid' region (skimage filters with reflection and
then crops (win − 1)/2 from every border, which is the same thing). Thin axes
(a training crop has ~8 slices) get the largest odd window that fits, so the
loss is 3D whatever the crop. MS-SSIM (Wang et al. 2003) uses the standard
five scale weights, truncated and renormalised to the scales the crop allows;
downsampling is 2× average pooling in Y and X only (Z is too thin), written as
a reshape-mean because avg_pool3d's CUDA backward is not deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SIGMA, TRUNCATE, K1, K2 = 1.5, 3.5, 0.01, 0.03
WIN = 2 * int(TRUNCATE * SIGMA + 0.5) + 1
LOSSES = ("mse", "l1", "l1_msssim")


def _as_5d(x: torch.Tensor) -> torch.Tensor:
    if not 3 <= x.ndim <= 5:
        raise ValueError(f"SSIM expects (Z,Y,X), (C,Z,Y,X) or (B,C,Z,Y,X), got {tuple(x.shape)}")
    return x.reshape((1,) * (5 - x.ndim) + tuple(x.shape))


def _gauss(n: int, device, dtype) -> torch.Tensor:
    """The scipy.ndimage.gaussian_filter1d taps for `n` (odd) points, normalised to sum 1."""
    r = torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2
    w = torch.exp(-0.5 * (r / SIGMA) ** 2)
    return (w / w.sum()).to(dtype)


def _window(size: int) -> int:
    return min(WIN, size if size % 2 else size - 1)


def _filter(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian 'valid' filtering of (N, 1, Z, Y, X)."""
    for axis in range(3):
        n = _window(x.shape[2 + axis])
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = n
        x = F.conv3d(x, _gauss(n, x.device, x.dtype).reshape(shape))
    return x


def _ssim_cs(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor):
    """Per-sample mean SSIM and contrast-structure term of (N, 1, Z, Y, X) pairs."""
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mx, my = _filter(x), _filter(y)
    vx = _filter(x * x) - mx * mx
    vy = _filter(y * y) - my * my
    cxy = _filter(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    ssim = (2 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def _prepare(pred, target, data_range):
    x, y = _as_5d(pred), _as_5d(target)
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.reshape(-1, 1, *x.shape[2:])
    y = y.reshape(-1, 1, *y.shape[2:])
    if data_range is None:  # per sample, from the target (normalized data has no fixed range)
        flat = y.detach().flatten(1)
        data_range = (flat.amax(1) - flat.amin(1)).clamp_min(1e-6)
    data_range = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1, 1)
    return x, y, data_range


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range=None) -> torch.Tensor:
    """Mean single-scale 3D SSIM per sample (B·C,); data_range None = the target's range."""
    x, y, dr = _prepare(pred, target, data_range)
    return _ssim_cs(x, y, dr)[0]


def n_scales(shape_yx) -> int:
    """How many MS-SSIM scales a (Y, X) crop allows: the coarsest keeps >= one full window."""
    n, size = 1, min(shape_yx)
    while n < len(MS_SSIM_WEIGHTS) and size // 2 >= WIN:
        n, size = n + 1, size // 2
    return n


def _down_yx(x: torch.Tensor) -> torch.Tensor:
    n, c, z, h, w = x.shape
    x = x[..., : h - h % 2, : w - w % 2]
    return x.reshape(n, c, z, h // 2, 2, w // 2, 2).mean((4, 6))


def ms_ssim(pred: torch.Tensor, target: torch.Tensor, data_range=None, eps=1e-4) -> torch.Tensor:
    """3D MS-SSIM per sample (B·C,). Terms are clamped at `eps` so fractional powers of
    negative or zero similarities never give NaN values or gradients."""
    x, y, dr = _prepare(pred, target, data_range)
    scales = n_scales(x.shape[-2:])
    w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    out = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(scales):
        ssim_s, cs = _ssim_cs(x, y, dr)
        term = ssim_s if s == scales - 1 else cs
        out = out * term.clamp_min(eps) ** w[s]
        if s < scales - 1:
            x, y = _down_yx(x), _down_yx(y)
    return out


def l1_msssim_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """α·L1 + (1 − α)·(1 − MS-SSIM): L1 keeps intensities calibrated, MS-SSIM rewards structure."""
    l1 = F.l1_loss(pred, target)
    return alpha * l1 + (1 - alpha) * (1 - ms_ssim(pred, target).mean())


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "mse":
        return F.mse_loss
    if name == "l1":
        return F.l1_loss
    if name == "l1_msssim":
        return l1_msssim_loss
    raise ValueError(f"unknown loss {name!r} (expected one of {list(LOSSES)})")
