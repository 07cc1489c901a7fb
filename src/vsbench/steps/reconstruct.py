"""Step `reconstruct`: tilt per FOV (searched on t=0), Phase3D for every t, tilt.csv.

The tilt found on t=0 is reused for the later timepoints of the same FOV (rows with
skipped=True); their loss is the search loss of that reused tilt on their own data, so a
drift over time shows up in the table.
"""

from vsbench.steps import setup

log = setup(snakemake, "reconstruct")

import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench.preprocess import fov_statistics, statistics_from_sample, strided_sample  # noqa: E402
from vsbench.reconstruct import (  # noqa: E402
    Optics,
    PhaseReconstructor,
    TiltSearch,
    check_brightfield,
    search_settings,
)
from vsbench.steps import resolve_device, torch_threads  # noqa: E402

CHANNEL = "Phase3D"
COLUMNS = [
    "fov",
    "t",
    "subtile",
    "zenith",
    "azimuth",
    "z_offset",
    "loss",
    "iterations",
    "skipped",
    "method",
    "wall_s",
    "true_zenith",
    "true_azimuth",
]


def simulated_truth(pos) -> tuple[float, float]:
    """(zenith, azimuth in [0, 2π)) the simulator stored, NaN for real data."""
    sim = dict(pos.zattrs).get("simulation") or {}
    zen, azi = sim.get("zenith"), sim.get("azimuth")
    return (
        float(zen) if zen is not None else math.nan,
        float(azi) % (2 * math.pi) if azi is not None else math.nan,
    )


def check_scale(pos, optics: Optics, where: str) -> None:
    """The manifest's optics drive the physics; a store scale that disagrees is suspicious."""
    scale = io.scale_zyx(pos)
    if not np.allclose(scale, optics.pixel_size_zyx, rtol=1e-3):
        log.warning(
            "%s: store scale (z, y, x) %s differs from the manifest pixel size %s; using the manifest",
            where,
            scale,
            optics.pixel_size_zyx,
        )


def main(sm) -> None:
    store = str(sm.input.store)
    manifest = dict(sm.params.manifest)
    dataset = str(sm.params.dataset)
    raw_settings = dict(sm.params.settings or {})
    settings = search_settings(raw_settings)
    stride = int(raw_settings.get("sample_stride", 32))
    device = resolve_device(sm.params.device)
    threads = torch_threads(sm)
    optics = Optics.from_manifest(manifest, where=f"dataset {dataset!r} manifest")
    brightfield = str(manifest.get("brightfield", "BF"))
    log.info("dataset=%s device=%s threads=%d optics=%s", dataset, device, threads, optics)
    log.info("settings=%s", settings)

    plate = io.open_plate(store)
    fovs = io.fov_names(plate)
    if not fovs:
        raise io.InputError(f"{store}: plate has no FOVs")
    for fov in fovs:  # fail before writing anything
        pos = io.position(plate, fov, store)
        io.channel_index(pos.channel_names, brightfield, f"{store} FOV {fov}")
        shape = tuple(pos["0"].shape)
        if len(shape) != 5 or shape[2] < 2:
            raise io.InputError(f"{store} FOV {fov}: expected TCZYX with Z >= 2, got {shape}")

    search = TiltSearch(optics, settings, device)
    out = io.create_plate(sm.output.phase, [CHANNEL])
    rows, samples = [], []
    t_start = time.perf_counter()
    for fov in fovs:
        pos = plate[fov]
        where = f"{store} FOV {fov}"
        check_scale(pos, optics, where)
        n_t = pos["0"].shape[0]
        true_zen, true_azi = simulated_truth(pos)

        zyx0 = io.read_channel(pos, brightfield, where, t=0)
        check_brightfield(zyx0, f"{where} t=0")
        est = search(zyx0)
        rows.append(
            {
                "fov": fov,
                "t": 0,
                "subtile": 0,
                "zenith": est["zenith"],
                "azimuth": est["azimuth"],
                "z_offset": 0.0,
                "loss": est["loss"],
                "iterations": est["iterations"],
                "skipped": False,
                "method": "grid",
                "wall_s": est["wall_s"],
                "true_zenith": true_zen,
                "true_azimuth": true_azi,
            }
        )
        log.info(
            "%s: zenith %.4f azimuth %.4f (truth %.4f %.4f) loss %.6g, %d candidates, %.2f s",
            fov,
            est["zenith"],
            est["azimuth"],
            true_zen,
            true_azi,
            est["loss"],
            est["iterations"],
            est["wall_s"],
        )

        recon = PhaseReconstructor(
            zyx0.shape,
            optics,
            est["zenith"],
            est["azimuth"],
            settings["regularization"],
            settings["z_padding"],
            device,
        )
        opos = io.create_fov(out, fov, (n_t, 1, *zyx0.shape), io.scale_zyx(pos))
        fov_samples = []
        for t in range(n_t):
            zyx = zyx0 if t == 0 else io.read_channel(pos, brightfield, where, t=t)
            if t > 0:
                check_brightfield(zyx, f"{where} t={t}")
                t0 = time.perf_counter()
                loss = search.loss_at(zyx, est["zenith"], est["azimuth"], est["crop"])
                rows.append(
                    {
                        **rows[-1],
                        "t": t,
                        "loss": loss,
                        "iterations": 1,
                        "skipped": True,
                        "wall_s": time.perf_counter() - t0,
                    }
                )
            phase = recon(zyx)
            opos["0"][t, 0] = phase
            fov_samples.append(strided_sample(phase, stride))
        fov_stats, per_t = fov_statistics(np.stack(fov_samples), stride=1)
        opos.zattrs["normalization"] = io.to_jsonable(
            {CHANNEL: {"fov_statistics": fov_stats, "timepoint_statistics": per_t}}
        )
        samples.append(np.stack(fov_samples).ravel())

    out.zattrs["normalization"] = io.to_jsonable(
        {CHANNEL: {"dataset_statistics": statistics_from_sample(np.concatenate(samples))}}
    )
    out.close()
    plate.close()
    io.write_table(pd.DataFrame(rows, columns=COLUMNS), sm.output.tilt)
    log.info("%d FOVs reconstructed in %.1f s", len(fovs), time.perf_counter() - t_start)


main(snakemake)
