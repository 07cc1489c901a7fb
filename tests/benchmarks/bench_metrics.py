"""Benchmark: the pixel-metric bundle (vsbench, torch) vs the cubic + skimage CPU reference.

    .venv/bin/python tests/benchmarks/bench_metrics.py [--shape 15 512 512] [--repeats 3]
        [--threads 2] [--device cpu|cuda]

One structured GT volume and a noisy, blurred prediction with 40 cell labels. The
reference computes the same numbers the way a hand-written evaluation would: numpy PCC,
skimage SSIM (Gaussian σ 1.5 on min–max scaled volumes), NRMSE and PSNR, cubic's
spectral_pcc and a per-label numpy PCC loop. vsbench computes them in one
`vsbench.metrics.pixel_metrics` call (device-resident torch, one host transfer). FSC is
cubic on both sides and is timed once separately. Prints the median seconds of each and
the ratio, and the largest difference between the two sets of numbers. Not collected by
pytest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def reference(gt, pred, spacing, cells):
    from cubic.metrics import spectral_pcc
    from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

    from vsbench.metrics import minmax

    g, p = minmax(gt), minmax(pred)
    out = {
        "PCC": float(np.corrcoef(gt.ravel(), pred.ravel())[0, 1]),
        "SSIM": structural_similarity(
            g, p, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
        ),  # fmt: skip
        "NRMSE": normalized_root_mse(g, p, normalization="min-max"),
        "PSNR": peak_signal_noise_ratio(g, p, data_range=1),
        "Spectral_PCC": spectral_pcc(pred, gt, spacing=list(spacing)),
    }
    per = [np.corrcoef(gt[cells == c], pred[cells == c])[0, 1] for c in np.unique(cells[cells > 0])]
    out["PerCell_PCC_mean"], out["PerCell_PCC_median"] = float(np.mean(per)), float(np.median(per))
    return out


def main() -> None:
    import torch
    from cubic.metrics import fsc_resolution
    from scipy import ndimage as ndi

    from vsbench.metrics import pixel_metrics

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=(15, 512, 512))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    gt = (ndi.gaussian_filter(rng.random(shape), (1, 3, 3)) * 1000 + 100).astype(np.float32)
    pred = (ndi.gaussian_filter(gt, 1.0) + 5 * rng.normal(size=shape)).astype(np.float32)
    cells = np.zeros(shape, np.int32)
    for c in range(40):
        y, x = rng.integers(0, shape[1] - 40), rng.integers(0, shape[2] - 40)
        cells[:, y : y + 40, x : x + 40] = c + 1
    spacing = (2.0, 0.325, 0.325)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def time_it(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append(time.perf_counter() - t0)
        print("   times", [round(x, 3) for x in times])
        return statistics.median(times), result

    t_ref, ref = time_it(lambda: reference(gt, pred, spacing, cells))
    t_ours, ours = time_it(lambda: pixel_metrics(gt, pred, spacing, cells, args.device))
    t_fsc, _ = time_it(lambda: fsc_resolution(pred, spacing=list(spacing), resample_isotropic=True))
    print(f"pair {shape}, {args.threads} threads, device {args.device}, median of {args.repeats}")
    print(f"  reference (numpy + skimage + cubic): {t_ref:8.3f} s")
    print(f"  vsbench pixel_metrics:               {t_ours:8.3f} s   ratio {t_ref / t_ours:5.1f}x")
    print(f"  FSC (cubic, both sides):             {t_fsc:8.3f} s")
    worst = max(abs(ours[k] - ref[k]) for k in ref)
    print("  max |vsbench - reference| over " + ", ".join(ref) + f": {worst:.2e}")


if __name__ == "__main__":
    main()
