"""Benchmark: cached tilt optics + closed-form inverse (vsbench) vs waveorder 3.0.5, thin-3D.

    .venv/bin/python tests/benchmarks/bench_reconstruct_optics.py [--repeats 5] [--threads 2]
        [--device cpu|cuda] [--shape 21 256 256]

Both run in this process on the same data (a smooth random absorption + phase simulated with
waveorder's own forward model at a tilt), for a high-NA and a 20× preset. Rows:
- tf build: ``isotropic_thin_3d.calculate_transfer_function`` vs a cold ``TiltOptics`` +
  its TFs; "tf new z" / "tf new tilt" reuse the cached angle-free (resp. grid) tensors;
- inverse filter: waveorder's SVD filter (``calculate_singular_system`` + the einsum of
  ``apply_inverse_transfer_function``) vs ``tikhonov_filter``;
- reconstruct: ``isotropic_thin_3d.reconstruct`` per position vs ``reconstruct_thin`` with a
  cold optics object, with cached optics at a new tilt, and applying a cached filter.
Prints medians (ms) and ratios waveorder / vsbench, the same for the minima (steadier when
other jobs share the CPU), and the Pearson of the phases.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import time

PRESETS = {
    "high-NA": dict(
        wavelength=0.532, index_media=1.33, na_detection=1.2, na_illumination=0.5, px=0.1, dz=0.25
    ),
    "20x": dict(
        wavelength=0.45, index_media=1.0, na_detection=0.55, na_illumination=0.4, px=0.325, dz=2.0
    ),
}
ZENITH, AZIMUTH = 0.2, 1.0


def timed_pair(fw, fv, repeats, sync):
    """Median and min (ms) of two callables run alternately, so load drift hits both alike."""
    fw(), fv()  # warm-up
    sync()
    tw, tv = [], []
    for _ in range(repeats):
        for f, out in ((fw, tw), (fv, tv)):
            t0 = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - t0)
    return [1e3 * f(t) for t in (tw, tv) for f in (statistics.median, min)]


def bench_preset(name, p, args, dev, sync, obj, g):
    """Time one optics preset; prints its rows."""
    import numpy as np
    import torch
    from waveorder.models import isotropic_thin_3d as it

    from vsbench.reconstruct import TiltOptics, apply_filter, reconstruct_thin, tikhonov_filter

    nz, ny, nx = args.shape
    px, dz = p["px"], p["dz"]
    optics = {k: p[k] for k in ("wavelength", "index_media", "na_detection", "na_illumination")}
    z = ((-torch.arange(nz) + nz // 2) * dz).to(dev)
    z2 = z + 0.37 * dz
    zen = torch.tensor(ZENITH, device=dev)
    azi = torch.tensor(AZIMUTH, device=dev)

    def wo_tf(zz=z):
        return it.calculate_transfer_function(
            (ny, nx),
            px,
            zz,
            p["wavelength"],
            p["index_media"],
            p["na_illumination"],
            p["na_detection"],
            tilt_angle_zenith=zen,
            tilt_angle_azimuth=azi,
        )

    with torch.no_grad():
        hu_w, hp_w = wo_tf()
        data = it.apply_transfer_function(obj[0].to(dev), obj[1].to(dev), hu_w, hp_w)
        data = data + 0.01 * torch.randn(data.shape, generator=g).to(dev)
        cached = TiltOptics((ny, nx), px, zenith=zen, azimuth=azi, device=dev, **optics)
        filt = tikhonov_filter(*cached.transfer_functions(z))

        def wo_filter():
            u, s, vh = it.calculate_singular_system(hu_w, hp_w)
            return torch.einsum("sj...,j...,jf...->fs...", u, s / (s**2 + 1e-3), vh)

        def wo_recon():
            return it.reconstruct(
                data,
                px,
                z,
                p["wavelength"],
                p["index_media"],
                p["na_illumination"],
                p["na_detection"],
                tilt_angle_zenith=zen,
                tilt_angle_azimuth=azi,
            )

        def cold_tf():
            o = TiltOptics((ny, nx), px, zenith=zen, azimuth=azi, device=dev, **optics)
            return o.transfer_functions(z)

        def cold_recon():
            o = TiltOptics((ny, nx), px, zenith=zen, azimuth=azi, device=dev, **optics)
            return reconstruct_thin(data, o, z, convention="waveorder")

        def new_tilt_recon():
            cached.set_tilt(zen + 0.01, azi)
            return reconstruct_thin(data, cached, z, convention="waveorder")

        rows = [
            ("tf build (cold)", wo_tf, cold_tf),
            (
                "tf new z list (cached)",
                lambda: wo_tf(z2),
                lambda: cached.transfer_functions(z2),
            ),
            (
                "tf new tilt (cached grid)",
                wo_tf,
                lambda: (cached.set_tilt(zen, azi), cached.transfer_functions(z)),
            ),
            ("inverse filter", wo_filter, lambda: tikhonov_filter(hu_w, hp_w)),
            ("reconstruct (cold)", wo_recon, cold_recon),
            ("reconstruct (cached optics)", wo_recon, new_tilt_recon),
            ("reconstruct (cached filter)", wo_recon, lambda: apply_filter(data, filt)),
        ]
        for label, fw, fv in rows:
            tw, tw_min, tv, tv_min = timed_pair(fw, fv, args.repeats, sync)
            print(
                f"{name:8} {label:28} {tw:10.1f} {tv:10.1f} {tw / tv:6.1f}x"
                f" {tw_min:10.1f} {tv_min:10.1f} {tw_min / tv_min:6.1f}x"
            )
        _, ph_w = wo_recon()
        _, ph_v = cold_recon()
        _, ph_e = reconstruct_thin(data, cached.set_tilt(zen, azi), z, convention="exact")
        r = np.corrcoef(ph_w.cpu().numpy().ravel(), ph_v.cpu().numpy().ravel())[0, 1]
        r_true = np.corrcoef(ph_e.cpu().numpy().ravel(), obj[1].numpy().ravel())[0, 1]
        print(
            f"{name:8} pearson(phase vsbench 'waveorder' convention, waveorder) = {r:.7f}; "
            f"pearson(phase 'exact', true phase) = {r_true:.4f} (upsampling ×{cached.factor})"
        )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=(21, 256, 256))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    nz, ny, nx = args.shape
    print(
        f"thin-3D, (Z, Y, X) = {tuple(args.shape)}, tilt ({ZENITH}, {AZIMUTH}), device {dev}, "
        f"{torch.get_num_threads()} threads, median / min of {args.repeats} (ms)"
    )
    g = torch.Generator().manual_seed(0)
    fy = torch.fft.fftfreq(ny)[:, None]
    fx = torch.fft.fftfreq(nx)[None, :]
    obj = [
        torch.fft.ifft2(
            torch.fft.fft2(torch.randn(ny, nx, generator=g)) * torch.exp(-(fy**2 + fx**2) / 0.02)
        ).real
        for _ in range(2)
    ]
    obj = [o / o.abs().max() * 0.1 for o in obj]

    header = (
        f"{'preset':8} {'row':28} {'waveorder':>10} {'vsbench':>10} {'ratio':>7}"
        f" {'wo (min)':>10} {'vs (min)':>10} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, p in PRESETS.items():
        bench_preset(name, p, args, dev, sync, obj, g)


if __name__ == "__main__":
    main()
