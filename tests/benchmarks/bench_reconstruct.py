"""Benchmark: the reconstruct step on a demo dataset, its recovery errors, and one FOV's
per-subtile optimisation against waveorder's optimiser side by side.

    .venv/bin/python tests/benchmarks/bench_reconstruct.py [--dataset ipsc] [--threads 2]
        [--method newton|nadam] [--loss residual|midband_power] [--workdir DIR]

1. simulates the demo dataset (vsbench.simulate, the manifest in resources/datasets) into a
   temporary plate and runs the reconstruct_shard step on all its FOVs in a subprocess
   (`python -m vsbench.steps`): wall time, then per FOV the subtile-median tilt and focus
   against the simulated truth, and the Pearson of Phase3D with the true phase;
2. on one FOV: vsbench's batched fit of all subtiles (grid start + Newton/NAdam) vs
   waveorder's `optim.optimize_reconstruction` (batched NAdam, mid-band loss, zenith and
   azimuth only: its batched mode takes no per-tile focus) from the same start.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def simulate(manifest: dict, dataset: str, path: Path, truth_path: Path) -> None:
    from vsbench import io
    from vsbench.simulate import TRUTH_CHANNELS, pixel_size_zyx, resolve_manifest, simulate_fovs

    spec = resolve_manifest(manifest, dataset)
    scale = pixel_size_zyx(spec["optics"])
    with (
        io.create_plate(path, spec["raw_channels"]) as plate,
        io.create_plate(truth_path, TRUTH_CHANNELS) as truth,
    ):
        for item in simulate_fovs(spec):
            attrs = io.to_jsonable({"simulation": item["attrs"]})
            io.write_fov(plate, item["fov"], item["raw"], scale).zattrs.update(attrs)
            io.write_fov(truth, item["fov"], item["truth"], scale)


def run_step(store: Path, out: Path, manifest: dict, dataset: str, args) -> float:
    from vsbench import io

    settings = {"optimize": {"method": args.method, "loss": args.loss}}
    params = {
        "dataset": dataset,
        "manifest": manifest,
        "settings": settings,
        "device": "cpu",
        "sample_stride": 32,
        "fovs": io.list_plate_fovs(store),
    }
    pfile = out / "params.json"
    pfile.write_text(json.dumps(params))
    cmd = [sys.executable, "-m", "vsbench.steps", "reconstruct", "--rule", "reconstruct_shard",
           "--input", f"store={store}", "--output", f"phase={out / 'phase.zarr'}",
           "--output", f"tilt={out / 'tilt.csv'}", "--params", str(pfile),
           "--threads", str(args.threads), "--log", str(out / "reconstruct.log")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def angle_error(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + math.pi) % (2 * math.pi) - math.pi)


def side_by_side(store: Path, manifest: dict, args) -> None:
    import torch
    from waveorder.models import isotropic_thin_3d as it
    from waveorder.optim import optimize_reconstruction
    from waveorder.optim.losses import MidbandPowerLossSettings, build_loss_fn

    from vsbench import io
    from vsbench.reconstruct import Optics
    from vsbench.reconstruct.optimize import OptimizeSettings, ThinTiltModel, optimize_tilt
    from vsbench.reconstruct.position import ReconstructSettings, cut_tiles, fit_timepoint

    torch.set_num_threads(args.threads)
    optics = Optics.from_manifest(manifest)
    with io.open_plate(store) as plate:
        fov = io.fov_names(plate)[-1]
        zyx = io.read_channel(plate[fov], manifest.get("brightfield", "BF"), fov, t=0)
        truth = dict(plate[fov].zattrs)["simulation"]
    s = ReconstructSettings.from_config({"optimize": {"method": args.method, "loss": args.loss}})
    t0 = time.perf_counter()
    tf = fit_timepoint(zyx, optics, s)
    t_ours = time.perf_counter() - t0
    f = tf.fit
    print(f"\nFOV {fov} (true zenith {truth['zenith']:.3f}, azimuth {truth['azimuth'] % (2 * math.pi):.3f},"
          f" z {truth['z_offset']:.2f}), {len(f)} subtiles of {tf.tile_shape}, {args.threads} threads")  # fmt: skip
    print(f"  vsbench  grid + {f.method}/{args.loss}: {t_ours:.2f} s, {f.iterations.max()} iterations;"
          f" zenith {np.median(f.zenith):.3f}, azimuth {np.median(f.azimuth):.3f}, z {np.median(f.z_offset):.2f}")  # fmt: skip

    origins, shape, tiles = cut_tiles(zyx, s.subtile_size, s.subtile_overlap)
    nz = zyx.shape[0]
    z_index = -torch.arange(nz) + nz // 2
    loss_fn = build_loss_fn(MidbandPowerLossSettings(), optics.na_detection, optics.wavelength_um,
                            optics.yx_pixel_size)  # fmt: skip

    def reconstruct_fn(d, zenith, azimuth):
        return it.reconstruct(d, optics.yx_pixel_size, z_index * optics.z_pixel_size,
                              optics.wavelength_um, optics.index_media, optics.na_illumination,
                              optics.na_detection, tilt_angle_zenith=zenith,
                              tilt_angle_azimuth=azimuth, pupil_steepness=100.0)[1]  # fmt: skip

    start = {
        "zenith": float(np.median(f.zenith)) * 0.6,
        "azimuth": float(np.median(f.azimuth)) + 0.3,
    }
    iters = 30
    t0 = time.perf_counter()
    res = optimize_reconstruction(
        torch.as_tensor(tiles), reconstruct_fn, loss_fn,
        {"zenith": (start["zenith"], 0.01), "azimuth": (start["azimuth"], 0.05)},
        method="nadam", max_iterations=iters,
    )  # fmt: skip
    t_wo = time.perf_counter() - t0
    wz, wa = np.asarray(res.optimized_values["zenith"]), np.asarray(res.optimized_values["azimuth"])
    print(f"  waveorder optimize_reconstruction, NAdam x {iters}, mid-band, from ({start['zenith']:.3f},"
          f" {start['azimuth']:.3f}): {t_wo:.2f} s -> zenith {np.median(np.abs(wz)):.3f},"
          f" azimuth {np.median(wa % (2 * math.pi)):.3f}")  # fmt: skip
    same = OptimizeSettings(method="nadam", loss="midband_power", max_iterations=iters, tolerance=-1.0,
                            lr={"z_offset": 0.0})  # fmt: skip
    t0 = time.perf_counter()
    ours = optimize_tilt(ThinTiltModel(tiles, optics, same), start, same)
    t_same = time.perf_counter() - t0
    print(f"  vsbench  same recipe (NAdam x {iters}, mid-band, z frozen): {t_same:.2f} s"
          f" ({t_wo / t_same:.1f}x) -> zenith {np.median(ours.zenith):.3f}, azimuth {np.median(ours.azimuth):.3f}")  # fmt: skip


def main() -> None:
    import pandas as pd
    import yaml

    from vsbench import io

    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ipsc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="newton")
    parser.add_argument("--loss", default="residual")
    parser.add_argument("--workdir", default=None, help="keep the plates here")
    args = parser.parse_args()
    manifest = yaml.safe_load((REPO / f"resources/datasets/{args.dataset}_demo.yaml").read_text())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reconstruct_"))
    work.mkdir(parents=True, exist_ok=True)
    store, truth = work / "preprocessed.zarr", work / "truth.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        simulate(manifest, args.dataset, store, truth)
        print(f"simulated {args.dataset} in {time.perf_counter() - t0:.1f} s -> {store}")

    wall = run_step(store, work, manifest, args.dataset, args)
    tilt = pd.read_csv(work / "tilt.csv")
    first = tilt[tilt.t == 0]
    per_fov = first.groupby("fov").agg(
        zenith=("zenith", "median"), true_zenith=("true_zenith", "first"),
        azimuth=("azimuth", "median"), true_azimuth=("true_azimuth", "first"),
        z_offset=("z_offset", "median"), true_z_offset=("true_z_offset", "first"),
        iterations=("iterations", "max"),
    )  # fmt: skip
    with io.open_plate(work / "phase.zarr") as phase, io.open_plate(truth) as true:
        per_fov["phase_pcc"] = [
            float(np.corrcoef(np.ravel(phase[f]["0"][:, 0]), np.ravel(true[f]["0"][:, 0]))[0, 1])
            for f in per_fov.index
        ]
    n_skipped = int(tilt[tilt.t > 0].skipped.sum())
    print(f"reconstruct_shard ({args.threads} threads, {len(per_fov)} FOVs, T={tilt.t.max() + 1}, "
          f"{args.method}/{args.loss}): {wall:.1f} s wall; T-cache skipped {n_skipped} subtile rows")  # fmt: skip
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(per_fov.to_string())
    dz = (per_fov.zenith - per_fov.true_zenith).abs()
    da = angle_error(per_fov.azimuth, per_fov.true_azimuth)[per_fov.true_zenith >= 0.1]
    do = (per_fov.z_offset - per_fov.true_z_offset).abs()
    print(f"|zenith err| max {dz.max():.3f} mean {dz.mean():.3f} rad; |azimuth err| (zenith >= 0.1) "
          f"max {da.max():.3f} rad; |z err| max {do.max():.2f} mean {do.mean():.2f} slices; "
          f"Phase3D vs truth Pearson {per_fov.phase_pcc.mean():.3f}")  # fmt: skip
    side_by_side(store, manifest, args)


if __name__ == "__main__":
    main()
