"""Benchmark: the reconstruct step on a demo-sized dataset, and its parts against waveorder.

    .venv/bin/python tests/benchmarks/bench_reconstruct.py [--dataset ipsc] [--threads 2]

1. simulates the demo dataset (vsbench.simulate, the manifest in resources/datasets) into a
   temporary plate, runs the step script in a subprocess (`python -m vsbench.steps`) and
   reports its wall time and the tilt errors against the simulated truth;
2. times one FOV side by side: the batched grid search (this package) against waveorder's
   way of scoring the same candidates (one `phase_thick_3d.reconstruct` + its mid-band loss
   per candidate), and the final reconstruction of all timepoints against
   `phase_thick_3d.reconstruct` per timepoint (with the max abs difference).
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


def simulate(manifest: dict, dataset: str, path: Path) -> None:
    from vsbench import io
    from vsbench.simulate import pixel_size_zyx, resolve_manifest, simulate_fovs

    spec = resolve_manifest(manifest, dataset)
    scale = pixel_size_zyx(spec["optics"])
    with io.create_plate(path, spec["raw_channels"]) as plate:
        for item in simulate_fovs(spec):
            pos = io.write_fov(plate, item["fov"], item["raw"], scale)
            pos.zattrs.update(io.to_jsonable({"simulation": item["attrs"]}))


def run_step(store: Path, out: Path, manifest: dict, dataset: str, threads: int) -> float:
    params = {
        "dataset": dataset,
        "manifest": manifest,
        "settings": {
            "regularization": 1e-3,
            "z_padding": 0,
            "max_zenith": 0.35,
            "n_zenith": 8,
            "n_azimuth": 12,
            "loss_band": [0.125, 0.25],
        },
        "device": "cpu",
    }
    pfile = out / "params.json"
    pfile.write_text(json.dumps(params))
    cmd = [
        sys.executable,
        "-m",
        "vsbench.steps",
        "reconstruct",
        "--input",
        f"store={store}",
        "--output",
        f"phase={out / 'phase.zarr'}",
        "--output",
        f"tilt={out / 'tilt.csv'}",
        "--params",
        str(pfile),
        "--threads",
        str(threads),
        "--log",
        str(out / "reconstruct.log"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def angle_error(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + math.pi) % (2 * math.pi) - math.pi)


def side_by_side(store: Path, manifest: dict, threads: int) -> None:
    import torch
    from waveorder.models import phase_thick_3d
    from waveorder.optim.losses import MidbandPowerLossSettings, build_loss_fn

    from vsbench import io
    from vsbench.reconstruct import SEARCH_STEEPNESS, Optics, TiltSearch, reconstruct_phase

    torch.set_num_threads(threads)
    optics = Optics.from_manifest(manifest)
    with io.open_plate(store) as plate:
        fov = io.fov_names(plate)[-1]
        tzyx = io.read_channel(plate[fov], manifest.get("brightfield", "BF"), fov)
    print(f"\nside by side on FOV {fov}, shape {tzyx.shape}, {threads} threads")

    search = TiltSearch(optics, {}, "cpu")
    t0 = time.perf_counter()
    est = search(tzyx[0])  # includes the bank, first FOV of a dataset
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = search(tzyx[0])  # bank cached: every later FOV
    t_next = time.perf_counter() - t0
    n_grid = len(search.coarse_grid()[0])
    print(
        f"  ours   : grid+refine {est['iterations']} candidates on a {est['crop'][2]}px crop: "
        f"{t_first:.2f} s (first FOV, builds the {n_grid}-candidate bank), {t_next:.2f} s (later FOVs)"
    )

    # waveorder's way: one reconstruct + loss per candidate, same crop, same grid, same
    # (search) regularization
    y0, x0, size = est["crop"]
    crop = torch.as_tensor(tzyx[0, :, y0 : y0 + size, x0 : x0 + size])
    loss_fn = build_loss_fn(
        MidbandPowerLossSettings(),
        NA_det=optics.na_detection,
        wavelength=optics.wavelength_um,
        pixel_size=optics.yx_pixel_size,
    )
    zen, azi = search.coarse_grid()
    t0 = time.perf_counter()
    with torch.no_grad():
        losses = [
            float(
                loss_fn(
                    phase_thick_3d.reconstruct(
                        crop,
                        z_padding=0,
                        tilt_angle_zenith=float(z),
                        tilt_angle_azimuth=float(a),
                        pupil_steepness=SEARCH_STEEPNESS,
                        regularization_strength=est["search_regularization"],
                        **optics.tf_kwargs(),
                    )
                )
            )
            for z, a in zip(zen, azi, strict=True)
        ]
    t_wo = time.perf_counter() - t0
    k = int(np.argmin(losses))
    print(
        f"  waveorder: sequential reconstruct+loss over the {n_grid}-candidate coarse grid only: "
        f"{t_wo:.2f} s -> zenith {float(zen[k]):.3f} azimuth {float(azi[k]):.3f} "
        f"(ours after refinement {est['zenith']:.3f} {est['azimuth']:.3f})"
    )

    t0 = time.perf_counter()
    ours = reconstruct_phase(tzyx, optics, est["zenith"], est["azimuth"])
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = np.stack(
        [
            phase_thick_3d.reconstruct(
                torch.as_tensor(zyx),
                z_padding=0,
                tilt_angle_zenith=est["zenith"],
                tilt_angle_azimuth=est["azimuth"],
                regularization_strength=1e-3,
                **optics.tf_kwargs(),
            ).numpy()
            for zyx in tzyx
        ]
    )
    t_ref = time.perf_counter() - t0
    print(
        f"  final reconstruction of T={len(tzyx)}: ours {t_ours:.2f} s, waveorder {t_ref:.2f} s, "
        f"max |diff| {np.abs(ours - ref).max():.2e} (phase range {np.ptp(ref):.3f})"
    )


def main() -> None:
    import pandas as pd
    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ipsc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep the plates here")
    args = parser.parse_args()
    manifest = yaml.safe_load((REPO / f"resources/datasets/{args.dataset}_demo.yaml").read_text())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_reconstruct_"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "preprocessed.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        simulate(manifest, args.dataset, store)
        print(f"simulated {args.dataset} in {time.perf_counter() - t0:.1f} s -> {store}")

    wall = run_step(store, work, manifest, args.dataset, args.threads)
    tilt = pd.read_csv(work / "tilt.csv")
    first = tilt[tilt.t == 0]
    print(f"reconstruct step ({args.threads} threads, {len(first)} FOVs): {wall:.1f} s wall")
    dz = np.abs(first.zenith - first.true_zenith)
    da = angle_error(first.azimuth, first.true_azimuth)
    with pd.option_context("display.width", 160, "display.precision", 3):
        print(tilt[["fov", "t", "zenith", "true_zenith", "azimuth", "true_azimuth", "loss",
                    "iterations", "skipped", "wall_s"]].to_string(index=False))  # fmt: skip
    print(f"zenith |err| max {dz.max():.3f} rad; azimuth |err| max {da.max():.3f} rad")
    side_by_side(store, manifest, args.threads)


if __name__ == "__main__":
    main()
