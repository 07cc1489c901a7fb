"""Cached tilt optics and the closed-form Tikhonov inverse against waveorder's thin-3D model."""

import math

import numpy as np
import pytest
import torch
from waveorder.models import isotropic_thin_3d

from vsbench.reconstruct import (
    TiltOptics,
    apply_filter,
    reconstruct_thin,
    tikhonov_filter,
)

HIGH_NA = dict(wavelength=0.532, index_media=1.33, na_detection=1.2, na_illumination=0.5)
LOW_NA = dict(wavelength=0.45, index_media=1.0, na_detection=0.55, na_illumination=0.4)
PRESETS = {"high_na": (HIGH_NA, 0.1, 0.25), "20x": (LOW_NA, 0.325, 2.0)}  # optics, px, dz
SHAPE = (48, 40)
Z = 7
TILTS = {
    "untilted": (0.0, 0.0),
    "tilted": (0.3, 1.0),
    "batched": (torch.tensor([0.0, 0.15, 0.3]), torch.tensor([0.0, 2.0, 4.5])),
}


def rel(a, b):
    return float((a - b).abs().norm() / b.abs().norm())


def z_list(dz, n=Z):
    return (-torch.arange(n) + n // 2) * dz


def waveorder_tf(optics, px, dz, zenith, azimuth, shape=SHAPE, n=Z):
    return isotropic_thin_3d.calculate_transfer_function(
        shape,
        px,
        z_list(dz, n),
        optics["wavelength"],
        optics["index_media"],
        optics["na_illumination"],
        optics["na_detection"],
        tilt_angle_zenith=zenith,
        tilt_angle_azimuth=azimuth,
    )


def ours(optics, px, zenith, azimuth, shape=SHAPE, device=None, compact_grid=True):
    return TiltOptics(
        shape,
        px,
        zenith=zenith,
        azimuth=azimuth,
        device=device,
        compact_grid=compact_grid,
        **optics,
    )


def waveorder_filter(hu, hp, reg):
    """The filter waveorder's apply_inverse_transfer_function builds from its SVD: (…, 2, Z)."""
    u, s, vh = isotropic_thin_3d.calculate_singular_system(hu, hp)
    s_reg = s / (s**2 + reg)
    if s.ndim == 3:
        return torch.einsum("sj...,j...,jf...->sf...", u, s_reg, vh)
    return torch.einsum("bsj...,bj...,bjf...->bsf...", u, s_reg, vh)


def phantom(shape=SHAPE, seed=0):
    """Smooth random absorption and phase (band-limited, so the inverse is well posed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(shape, generator=g)
        fy = torch.fft.fftfreq(shape[0])[:, None]
        fx = torch.fft.fftfreq(shape[1])[None, :]
        x = torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(-((fy**2 + fx**2) / 0.02))).real
        out.append(x / x.abs().max() * 0.1)
    return out


def simulate(hu, hp, absorption, phase):
    return isotropic_thin_3d.apply_transfer_function(absorption, phase, hu, hp)


def pearson(a, b):
    a, b = np.ravel(np.asarray(a, dtype=np.float64)), np.ravel(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(a, b)[0, 1])


# --------------------------------------------------------------------------- optics


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tilt", TILTS)
def test_transfer_functions_equal_waveorder(preset, tilt, compact):
    optics, px, dz = PRESETS[preset]
    zen, azi = TILTS[tilt]
    hu_w, hp_w = waveorder_tf(optics, px, dz, zen, azi)
    hu, hp = ours(optics, px, zen, azi, compact_grid=compact).transfer_functions(z_list(dz))
    assert hu.shape == hu_w.shape and hp.shape == hp_w.shape
    assert rel(hu, hu_w) <= 1e-5
    assert rel(hp, hp_w) <= 1e-5


def test_upsampling_factor_follows_nyquist():
    assert ours(HIGH_NA, 0.1, 0.0, 0.0).factor == 1  # 0.1 < 0.532 / (2·1.7)
    o = ours(LOW_NA, 0.325, 0.0, 0.0, compact_grid=False)
    assert o.factor == 2 and o.big_shape == (96, 80)  # 0.325 / (0.45 / 1.9) → 2
    # compact: same frequency step, fewer samples (2R + n/2 + 2, R = pupil radius in steps)
    assert ours(LOW_NA, 0.325, 0.0, 0.0).big_shape == (70, 56)


def test_odd_shape_matches_waveorder():
    optics, px, dz = PRESETS["20x"]
    hu_w, hp_w = waveorder_tf(optics, px, dz, 0.2, 0.7, shape=(33, 27))
    for compact in (True, False):
        o = ours(optics, px, 0.2, 0.7, shape=(33, 27), compact_grid=compact)
        hu, hp = o.transfer_functions(z_list(dz))
        assert rel(hu, hu_w) <= 1e-5 and rel(hp, hp_w) <= 1e-5


def test_rebuild_for_new_z_and_new_tilt_reuses_the_grid():
    optics, px, dz = PRESETS["high_na"]
    o = ours(optics, px, 0.2, 0.5)
    grid = o.kz
    shifted = z_list(dz, 5) + 0.1
    hu, hp = o.transfer_functions(shifted)
    hu_w, hp_w = isotropic_thin_3d.calculate_transfer_function(
        SHAPE,
        px,
        shifted,
        optics["wavelength"],
        optics["index_media"],
        optics["na_illumination"],
        optics["na_detection"],
        tilt_angle_zenith=0.2,
        tilt_angle_azimuth=0.5,
    )
    assert hu.shape == (5, *SHAPE)
    assert rel(hu, hu_w) <= 1e-5 and rel(hp, hp_w) <= 1e-5
    o.set_tilt(0.1, 3.0)
    assert o.kz is grid
    hu, hp = o.transfer_functions(z_list(dz))
    hu_w, hp_w = waveorder_tf(optics, px, dz, 0.1, 3.0)
    assert rel(hu, hu_w) <= 1e-5 and rel(hp, hp_w) <= 1e-5


def test_batch_of_one_keeps_batch_axis_and_gradients_flow():
    optics, px, dz = PRESETS["high_na"]
    zen = torch.tensor([0.2], requires_grad=True)
    azi = torch.tensor([1.0], requires_grad=True)
    o = ours(optics, px, zen, azi)
    hu, hp = o.transfer_functions(z_list(dz))
    assert hu.shape == (1, Z, *SHAPE)
    hu_w, _ = waveorder_tf(optics, px, dz, 0.2, 1.0)
    assert rel(hu[0].detach(), hu_w) <= 1e-5
    (hp.abs() ** 2).sum().backward()
    assert zen.grad is not None and torch.isfinite(zen.grad).all() and azi.grad.abs() > 0


def test_bad_tilt_shapes_raise():
    optics, px, _ = PRESETS["high_na"]
    with pytest.raises(ValueError, match="1-D"):
        ours(optics, px, torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="empty"):
        ours(optics, px, torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="yx_shape"):
        TiltOptics((4,), px, **optics)


# --------------------------------------------------------------------------- inverse


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tilt", TILTS)
def test_filter_equals_waveorder_svd_filter(preset, tilt):
    optics, px, dz = PRESETS[preset]
    hu, hp = waveorder_tf(optics, px, dz, *TILTS[tilt])
    for reg in (1e-3, 1e-1):
        ours_f = tikhonov_filter(hu, hp, reg, convention="physical")
        assert rel(ours_f, waveorder_filter(hu, hp, reg)) <= 1e-4
        thin = tikhonov_filter(hu, hp, reg, convention="thin_forward")
        assert torch.equal(thin, torch.conj(ours_f))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tilt", ["untilted", "tilted"])
def test_reconstruction_matches_waveorder_reconstruct(preset, tilt):
    optics, px, dz = PRESETS[preset]
    zen, azi = TILTS[tilt]
    hu_w, hp_w = waveorder_tf(optics, px, dz, zen, azi)
    data = simulate(hu_w, hp_w, *phantom())
    # noise puts power at Nyquist, where rfft needs the filter's Hermitian part
    data = data + 0.01 * torch.randn(data.shape, generator=torch.Generator().manual_seed(3))
    abs_w, ph_w = isotropic_thin_3d.reconstruct(
        data,
        px,
        z_list(dz),
        optics["wavelength"],
        optics["index_media"],
        optics["na_illumination"],
        optics["na_detection"],
        tilt_angle_zenith=zen,
        tilt_angle_azimuth=azi,
    )
    o = ours(optics, px, zen, azi)
    for real_fft in (True, False):
        a, p = reconstruct_thin(data, o, z_list(dz), 1e-3, "physical", real_fft=real_fft)
        assert pearson(a, abs_w) >= 0.9999
        assert pearson(p, ph_w) >= 0.9999
        assert rel(p, ph_w) <= 1e-4 and rel(a, abs_w) <= 1e-4
    if tilt == "untilted":  # the two conventions coincide without tilt
        _, p_exact = reconstruct_thin(data, o, z_list(dz), 1e-3, "thin_forward")
        assert pearson(p_exact, ph_w) >= 0.9999


def test_batched_reconstruction_matches_per_tile_waveorder():
    optics, px, dz = PRESETS["high_na"]
    zen, azi = TILTS["batched"]
    hu_w, hp_w = waveorder_tf(optics, px, dz, zen, azi)
    absorption, phase = phantom(seed=1)
    data = torch.stack([simulate(hu_w[b], hp_w[b], absorption, phase) for b in range(3)])
    u, s, vh = isotropic_thin_3d.calculate_singular_system(hu_w, hp_w)
    _, ph_w = isotropic_thin_3d.apply_inverse_transfer_function(data, (u, s, vh))
    _, ph = reconstruct_thin(data, ours(optics, px, zen, azi), z_list(dz), 1e-3, "physical")
    assert ph.shape == (3, *SHAPE)
    for b in range(3):
        assert pearson(ph[b], ph_w[b]) >= 0.9999


def test_physical_filter_is_the_thin_forward_inverse_at_azimuth_plus_pi():
    """The finding documented in vsbench.reconstruct.inverse, checked three ways."""
    optics, px, dz = PRESETS["high_na"]
    zen, azi = 0.3, 1.0
    hu, hp = waveorder_tf(optics, px, dz, zen, azi)
    hu_pi, hp_pi = waveorder_tf(optics, px, dz, zen, azi + math.pi)
    # 1. waveorder's SVD filter is the conjugate of the exact pseudo-inverse (M̄Mᵀ+λ)⁻¹M̄
    m = torch.stack((hu, hp)).permute(2, 3, 0, 1)  # (Y, X, 2, Z)
    gram = m.conj() @ m.transpose(-1, -2) + 1e-3 * torch.eye(2)
    exact = torch.linalg.solve(gram, m.conj()).permute(2, 3, 0, 1)
    assert rel(waveorder_filter(hu, hp, 1e-3), exact.conj()) <= 1e-4
    # 2. ... which equals the exact filter at azimuth + π (measured 2.9e-5)
    w = tikhonov_filter(hu, hp, 1e-3, "physical")
    assert rel(w, tikhonov_filter(hu_pi, hp_pi, 1e-3, "thin_forward")) <= 1e-4
    # 3. on data simulated with waveorder's *thin* forward model at azimuth φ, its exact inverse
    #    at φ recovers the phase; waveorder's (physical) filter needs φ + π to do as well.
    absorption, phase = phantom(seed=2)
    data = simulate(hu, hp, absorption, phase)
    o = ours(optics, px, zen, azi)
    o_pi = ours(optics, px, zen, azi + math.pi)
    scores = {
        "thin_forward@φ": reconstruct_thin(data, o, z_list(dz), 1e-3, "thin_forward")[1],
        "physical@φ": reconstruct_thin(data, o, z_list(dz), 1e-3, "physical")[1],
        "physical@φ+π": reconstruct_thin(data, o_pi, z_list(dz), 1e-3, "physical")[1],
        "thin_forward@φ+π": reconstruct_thin(data, o_pi, z_list(dz), 1e-3, "thin_forward")[1],
    }
    r = {k: pearson(v, phase) for k, v in scores.items()}
    assert r["thin_forward@φ"] > 0.95 and r["physical@φ+π"] > 0.95
    assert pearson(scores["thin_forward@φ"], scores["physical@φ+π"]) >= 0.9999
    assert r["physical@φ"] < 0.5 and r["thin_forward@φ+π"] < 0.5  # measured 0.07 for both


def thick_sheet_data(optics, px, dz, zenith, azimuth, phase, n=Z):
    """A thin phase sheet in the middle plane, imaged by waveorder's phase_thick_3d model."""
    from waveorder.models import phase_thick_3d

    volume = torch.zeros((n, *phase.shape))
    volume[n // 2] = phase
    real_tf, _ = phase_thick_3d.calculate_transfer_function(
        volume.shape,
        px,
        dz,
        optics["wavelength"],
        0,
        optics["index_media"],
        optics["na_illumination"],
        optics["na_detection"],
        tilt_angle_zenith=zenith,
        tilt_angle_azimuth=azimuth,
    )
    return phase_thick_3d.apply_transfer_function(volume, real_tf, 0, brightness=1e3)


@pytest.mark.parametrize("preset", PRESETS)
def test_physical_convention_inverts_phase_thick_3d_imaging(preset):
    """The convention finding: thick model at φ ≈ thin forward model at φ + π, and the
    physical filter at φ (not φ + π) reconstructs the thick model's data (Z = 16)."""
    optics, px, dz = PRESETS[preset]
    zen, azi, n = 0.3, 1.0, 16
    _, phase = phantom(seed=4)
    data = thick_sheet_data(optics, px, dz, zen, azi, phase, n)
    thin = {
        name: simulate(*waveorder_tf(optics, px, dz, zen, a, n=n), torch.zeros_like(phase), phase)
        for name, a in (("φ", azi), ("φ+π", azi + math.pi))
    }
    # measured 0.89 / 0.96 (high-NA / 20x) at φ + π, against 0.21 / -0.22 at φ
    assert pearson(data, thin["φ+π"]) > 0.85 and pearson(data, thin["φ"]) < 0.3
    at = {
        name: pearson(reconstruct_thin(data, ours(optics, px, zen, a), z_list(dz, n))[1], phase)
        for name, a in (("φ", azi), ("φ+π", azi + math.pi))
    }
    # measured 0.91 / 0.97 at φ, 0.59 / 0.30 at φ + π
    assert at["φ"] > 0.9 and at["φ+π"] < at["φ"] - 0.25, at


def test_per_tile_z_lists_equal_separate_calls():
    optics, px, dz = PRESETS["20x"]
    zen, azi = torch.tensor([0.1, 0.3]), torch.tensor([0.5, 2.5])
    offsets = torch.tensor([0.3, -0.7])
    z = z_list(dz)[None] + offsets[:, None] * dz  # (B, Z)
    hu, hp = ours(optics, px, zen, azi).transfer_functions(z)
    assert hu.shape == (2, Z, *SHAPE)
    for b in range(2):
        hu_w, hp_w = isotropic_thin_3d.calculate_transfer_function(
            SHAPE,
            px,
            z[b],
            optics["wavelength"],
            optics["index_media"],
            optics["na_illumination"],
            optics["na_detection"],
            tilt_angle_zenith=float(zen[b]),
            tilt_angle_azimuth=float(azi[b]),
        )
        assert rel(hu[b], hu_w) <= 1e-5 and rel(hp[b], hp_w) <= 1e-5
    shared = ours(optics, px, 0.2, 1.0).transfer_functions(z)[1]  # one tilt, two z lists
    assert shared.shape == (2, Z, *SHAPE)
    with pytest.raises(ValueError, match="z lists"):
        ours(optics, px, torch.zeros(3), torch.zeros(3)).transfer_functions(z)
    with pytest.raises(ValueError, match="z positions"):
        ours(optics, px, 0.0, 0.0).transfer_functions(torch.zeros(1, 2, 3))


def test_filter_rejects_bad_input():
    hu = torch.zeros(3, 4, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="convention"):
        tikhonov_filter(hu, hu, convention="svd")
    with pytest.raises(ValueError, match="shape"):
        tikhonov_filter(hu, hu[:2])
    o = ours(HIGH_NA, 0.1, 0.0, 0.0, shape=(4, 4))
    with pytest.raises(ValueError, match="z positions"):
        reconstruct_thin(torch.ones(3, 4, 4), o, [0.0, 0.1])
    with pytest.raises(ValueError, match="YX"):
        reconstruct_thin(torch.ones(3, 5, 4), o, [0.0, 0.1, 0.2])


@pytest.mark.parametrize("shape", [(48, 40), (33, 27), (32, 27)])
def test_half_filter_is_the_hermitian_half_of_the_full_filter(shape):
    from vsbench.reconstruct.inverse import _hermitian_half, half_filter

    optics, px, dz = PRESETS["20x"]  # undersampled: TFs do not vanish at Nyquist
    hu, hp = waveorder_tf(optics, px, dz, 0.3, 1.0, shape=shape)
    full = _hermitian_half(tikhonov_filter(hu, hp))
    half = half_filter(hu, hp)
    assert half.shape == full.shape
    assert rel(half, full) <= 1e-5  # float32 rounding: measured 1.8e-6


def test_apply_filter_batch_equals_loop():
    optics, px, dz = PRESETS["high_na"]
    hu, hp = waveorder_tf(optics, px, dz, 0.2, 0.3)
    filt = tikhonov_filter(hu, hp)
    data = torch.stack([simulate(hu, hp, *phantom(seed=s)) for s in range(2)])
    a, p = apply_filter(data, filt)
    for b in range(2):
        ab, pb = apply_filter(data[b], filt)
        assert torch.allclose(p[b], pb, atol=1e-6) and torch.allclose(a[b], ab, atol=1e-6)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_residency_and_agreement():
    optics, px, dz = PRESETS["20x"]
    zen, azi = torch.tensor([0.1, 0.3]), torch.tensor([0.5, 2.5])
    cpu = ours(optics, px, zen, azi)
    gpu = ours(optics, px, zen.cuda(), azi.cuda())  # device taken from the angles
    assert gpu.device.type == "cuda"
    for t in (gpu.kz, gpu.pupil_sq, gpu.illumination, gpu.inv_norm, gpu.fxx):
        assert t.device.type == "cuda"
    hu_c, hp_c = cpu.transfer_functions(z_list(dz))
    hu_g, hp_g = gpu.transfer_functions(z_list(dz).cuda())
    assert hu_g.device.type == "cuda"
    assert rel(hu_g.cpu(), hu_c) <= 1e-5 and rel(hp_g.cpu(), hp_c) <= 1e-5
    data = torch.stack([simulate(hu_c[b], hp_c[b], *phantom(seed=b)) for b in range(2)])
    a_c, p_c = reconstruct_thin(data, cpu, z_list(dz))
    a_g, p_g = reconstruct_thin(data.cuda(), gpu, z_list(dz).cuda())
    assert p_g.device.type == "cuda" and a_g.device.type == "cuda"
    assert pearson(p_g.cpu(), p_c) >= 0.99999 and pearson(a_g.cpu(), a_c) >= 0.99999


def test_filter_is_differentiable_and_equal_with_gradients():
    optics, px, dz = PRESETS["high_na"]
    zen = torch.tensor([0.2, 0.25], requires_grad=True)
    hu, hp = ours(optics, px, zen, torch.tensor([1.0, 2.0])).transfer_functions(z_list(dz))
    filt = tikhonov_filter(hu, hp)
    with torch.no_grad():
        ref = tikhonov_filter(hu, hp)
    assert rel(filt.detach(), ref) <= 1e-6
    (filt[:, 1].abs() ** 2).sum().backward()
    assert torch.isfinite(zen.grad).all() and zen.grad.abs().sum() > 0


def test_symmetric_z_shortcut_equals_direct_computation():
    optics, px, dz = PRESETS["20x"]
    o = ours(optics, px, torch.tensor([0.1, 0.3]), torch.tensor([0.5, 2.5]))
    z = z_list(dz)[torch.randperm(Z, generator=torch.Generator().manual_seed(0))]
    hu, hp = o.transfer_functions(z)  # symmetric list: only z >= 0 computed
    hu_d, hp_d = o._transfer_functions(o.z_positions(z))
    assert rel(hu, hu_d) <= 1e-5 and rel(hp, hp_d) <= 1e-5


def test_gradient_through_z_positions():
    """A focus offset is optimised later: the TFs must be differentiable in z."""
    optics, px, dz = PRESETS["high_na"]
    offset = torch.tensor(0.1, requires_grad=True)
    o = ours(optics, px, 0.2, 1.0)
    hu, hp = o.transfer_functions(z_list(dz) + offset)
    _, hp_w = isotropic_thin_3d.calculate_transfer_function(
        SHAPE,
        px,
        z_list(dz) + 0.1,
        optics["wavelength"],
        optics["index_media"],
        optics["na_illumination"],
        optics["na_detection"],
        tilt_angle_zenith=0.2,
        tilt_angle_azimuth=1.0,
    )
    assert rel(hp.detach(), hp_w) <= 1e-5
    (hp.imag.sum() + hu.real.sum()).backward()
    assert torch.isfinite(offset.grad) and offset.grad != 0


def test_compact_grid_with_soft_pupil_matches_waveorder():
    """The optimiser uses pupil steepness 100: wider pupil tails, a larger compact grid."""
    optics, px, dz = PRESETS["20x"]
    hu_w, hp_w = isotropic_thin_3d.calculate_transfer_function(
        SHAPE,
        px,
        z_list(dz),
        optics["wavelength"],
        optics["index_media"],
        optics["na_illumination"],
        optics["na_detection"],
        tilt_angle_zenith=0.3,
        tilt_angle_azimuth=1.0,
        pupil_steepness=100.0,
    )
    o = TiltOptics(SHAPE, px, zenith=0.3, azimuth=1.0, pupil_steepness=100.0, **optics)
    assert o.big_shape[0] < 96
    hu, hp = o.transfer_functions(z_list(dz))
    assert rel(hu, hu_w) <= 1e-5 and rel(hp, hp_w) <= 1e-5
