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
  cold optics object, with cached optics at a new tilt, and applying a cached filter;
- optimisation step: what one iteration of waveorder's ``api.phase.optimize`` does (its thin
  ``reconstruct`` with gradients on zenith, azimuth and z offset, the mid-band loss,
  backward, NAdam step) vs the same with ``ThinTiltModel`` (same loss, same optimiser);
- 16 subtiles: the FOV cut into 4 × 4 subtiles, zenith + azimuth optimised per subtile for a
  fixed number of NAdam iterations in one batched pass — waveorder's
  ``optim.optimize_reconstruction`` (batched mode) vs ``optimize_tilt`` with early stopping
  off; and ``optimize_tilt`` with vsbench's defaults (Newton, residual loss, to convergence).
Prints medians (ms) and ratios waveorder / vsbench, the same for the minima (steadier when
other jobs share the CPU), and the Pearson of the phases.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
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
        # data at the physical tilt (ZENITH, AZIMUTH): waveorder's thin forward model at + π
        hu_pi, hp_pi = it.calculate_transfer_function((ny, nx), px, z, p["wavelength"],
            p["index_media"], p["na_illumination"], p["na_detection"],
            tilt_angle_zenith=zen, tilt_angle_azimuth=azi + math.pi)  # fmt: skip
        data = it.apply_transfer_function(obj[0].to(dev), obj[1].to(dev), hu_pi, hp_pi)
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
            return reconstruct_thin(data, o, z, convention="physical")

        def new_tilt_recon():
            cached.set_tilt(zen + 0.01, azi)
            return reconstruct_thin(data, cached, z, convention="physical")

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
        r = np.corrcoef(ph_w.cpu().numpy().ravel(), ph_v.cpu().numpy().ravel())[0, 1]
        print(f"{name:8} pearson(phase vsbench, waveorder) = {r:.7f} (upsampling ×{cached.factor})")
    bench_optimisation(name, p, args, dev, sync, data)


def bench_optimisation(name, p, args, dev, sync, data):
    """One optimisation step on the FOV, and a 16-subtile optimisation, side by side."""
    import torch
    from waveorder.models import isotropic_thin_3d as it
    from waveorder.optim import optimize_reconstruction
    from waveorder.optim.losses import MidbandPowerLossSettings, build_loss_fn

    from vsbench.reconstruct import Optics
    from vsbench.reconstruct.optimize import OptimizeSettings, ThinTiltModel, optimize_tilt

    nz, ny, nx = data.shape
    optics = Optics(p["wavelength"], p["na_detection"], p["na_illumination"], p["index_media"],
                    (p["dz"], p["px"], p["px"]))  # fmt: skip
    loss_fn = build_loss_fn(MidbandPowerLossSettings(), p["na_detection"], p["wavelength"], p["px"])
    z_index = (-torch.arange(nz, device=dev) + nz // 2).float()
    lr = {"zenith": 0.01, "azimuth": 0.05, "z_offset": 0.05}

    def wo_reconstruct(stack, zenith, azimuth, z_offset):
        z = (z_index + z_offset) * p["dz"]
        return it.reconstruct(stack, p["px"], z, p["wavelength"], p["index_media"],
                              p["na_illumination"], p["na_detection"], tilt_angle_zenith=zenith,
                              tilt_angle_azimuth=azimuth, pupil_steepness=100.0)[1]  # fmt: skip

    def wo_step_factory():
        params = [torch.tensor(v, device=dev, requires_grad=True) for v in (0.15, 0.8, 0.1)]
        opt = torch.optim.NAdam(
            [{"params": [t], "lr": r} for t, r in zip(params, lr.values(), strict=True)]
        )

        def step():
            opt.zero_grad()
            loss_fn(wo_reconstruct(data, *params)).backward()
            opt.step()

        return step

    settings = OptimizeSettings(method="nadam", loss="midband_power")
    model = ThinTiltModel(data[None], optics, settings, device=dev)

    def vs_step_factory():
        params = [torch.tensor([v], device=dev, requires_grad=True) for v in (0.15, 0.8, 0.1)]
        opt = torch.optim.NAdam(
            [{"params": [t], "lr": r} for t, r in zip(params, lr.values(), strict=True)]
        )

        def step():
            opt.zero_grad()
            model.loss(*params).sum().backward()
            opt.step()

        return step

    tw, tw_min, tv, tv_min = timed_pair(wo_step_factory(), vs_step_factory(), args.repeats, sync)
    print(f"{name:8} {'optimisation step (FOV)':28} {tw:10.1f} {tv:10.1f} {tw / tv:6.1f}x"
          f" {tw_min:10.1f} {tv_min:10.1f} {tw_min / tv_min:6.1f}x")  # fmt: skip

    t = ny // 4
    tiles = torch.stack(
        [data[:, y : y + t, x : x + t] for y in range(0, 4 * t, t) for x in range(0, 4 * t, t)]
    )
    iters = args.iterations

    def wo_tiles():
        with contextlib.redirect_stderr(io.StringIO()):  # waveorder's tqdm bar
            return optimize_reconstruction(
                tiles, lambda d, **kw: wo_reconstruct(d, kw["zenith"], kw["azimuth"], 0.0),
                loss_fn, {"zenith": (0.15, lr["zenith"]), "azimuth": (0.8, lr["azimuth"])},
                method="nadam", max_iterations=iters,
            )  # fmt: skip

    fixed = OptimizeSettings(method="nadam", loss="midband_power", max_iterations=iters, tolerance=-1.0,
                             lr={"z_offset": 0.0})  # fmt: skip
    tile_model = ThinTiltModel(tiles, optics, fixed, device=dev)

    def vs_tiles():
        return optimize_tilt(tile_model, {"zenith": 0.15, "azimuth": 0.8}, fixed)

    tw, tw_min, tv, tv_min = timed_pair(wo_tiles, vs_tiles, max(1, args.repeats // 2), sync)
    print(f"{name:8} {f'16 subtiles x {iters} NAdam':28} {tw:10.1f} {tv:10.1f} {tw / tv:6.1f}x"
          f" {tw_min:10.1f} {tv_min:10.1f} {tw_min / tv_min:6.1f}x")  # fmt: skip
    defaults = OptimizeSettings()
    t0 = time.perf_counter()
    fit = optimize_tilt(
        ThinTiltModel(tiles, optics, defaults, device=dev),
        {"zenith": 0.15, "azimuth": 0.8},
        defaults,
    )
    sync()
    print(f"{name:8} 16 subtiles, vsbench defaults (newton, residual, 3 unknowns): "
          f"{1e3 * (time.perf_counter() - t0):.0f} ms, {fit.iterations.max()} iterations, "
          f"zenith {fit.zenith.mean():.3f} ± {fit.zenith.std():.3f} (true {ZENITH})")  # fmt: skip


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=(21, 256, 256))
    ap.add_argument("--iterations", type=int, default=10, help="NAdam iterations, 16 subtiles")
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
