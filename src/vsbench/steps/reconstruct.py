"""Rules reconstruct_warmstart, reconstruct_shard and reconstruct (the gather).

reconstruct_warmstart (warm_start.mode "fit"): fit the tilt of a few positions spread over
the well radius at t=0 with the full recipe, and the plate's meniscus map to them → JSON.
reconstruct_shard: the positions of one shard (``params.fovs``): per-subtile tilt and focus
fit for every timepoint, Phase3D (and the 2D phase if asked) → shard stores + tilt table.
reconstruct: the shards gathered into one plate per output, the dataset-level normalization
statistics, the tilt table, and phase_qc.csv (reconstructed vs simulated true phase).
"""

from vsbench.steps import setup

log = setup(snakemake, "reconstruct")

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench.preprocess import fov_statistics, statistics_from_sample, strided_sample  # noqa: E402
from vsbench.reconstruct import Optics  # noqa: E402
from vsbench.reconstruct.position import (  # noqa: E402
    ReconstructSettings,
    fit_timepoint,
    reconstruct_position,
    tilt_summary,
)
from vsbench.reconstruct.warmstart import RadialMap, map_from_config  # noqa: E402
from vsbench.steps import bounded_map, resolve_device, torch_threads  # noqa: E402

PHASE3D, PHASE2D = "Phase3D", "Phase2D"
COLUMNS = [
    "fov",
    "t",
    "subtile",
    "y0",
    "x0",
    "zenith",
    "azimuth",
    "z_offset",
    "loss",
    "iterations",
    "converged",
    "skipped",
    "replaced",
    "init",
    "edge",
    "method",
    "wall_s",
    "position_y_um",
    "position_x_um",
    "true_zenith",
    "true_azimuth",
    "true_z_offset",
]


# ---------------------------------------------------------------- plate geometry


def simulated_truth(pos) -> dict[str, float]:
    """The tilt and focus the simulator stored (NaN for real data)."""
    sim = dict(pos.zattrs).get("simulation") or {}
    get = lambda k: float(sim[k]) if sim.get(k) is not None else math.nan  # noqa: E731
    return {
        "true_zenith": get("zenith"),
        "true_azimuth": get("azimuth") % (2 * math.pi),
        "true_z_offset": get("z_offset"),
    }


def position_um(pos, manifest: dict, fov: str) -> tuple[float, float] | None:
    """FOV centre relative to its well centre: simulator attrs, else the manifest's table."""
    sim = dict(pos.zattrs).get("simulation") or {}
    value = sim.get("position_um") or (manifest.get("positions_um") or {}).get(fov)
    return (float(value[0]), float(value[1])) if value is not None else None


def well_radius(manifest: dict, settings: dict) -> float | None:
    spec = (settings.get("warm_start") or {}).get("map") or {}
    return (
        spec.get("radius_um")
        or manifest.get("well_radius_um")
        or (manifest.get("simulate") or {}).get("well_radius_um")
    )


def geometry(plate, fovs, manifest, settings, store, need: bool):
    """{fov: (y, x) or None} and r_max; warm starts need every position."""
    positions = {fov: position_um(plate[fov], manifest, fov) for fov in fovs}
    missing = [f for f, p in positions.items() if p is None]
    if need and missing:
        raise io.InputError(
            f"{store}: warm_start needs FOV positions (manifest positions_um) but "
            f"FOV {missing[0]} has none ({len(missing)} missing)"
        )
    r_max = well_radius(manifest, settings)
    radii = [math.hypot(*p) for p in positions.values() if p is not None]
    if r_max is None and radii:
        r_max = max(radii)
    return positions, (float(r_max) if r_max else None)


def check_inputs(plate, fovs, store, brightfield) -> None:
    """Fail before writing anything: every FOV exists with a BF channel and a TCZYX stack."""
    if not fovs:
        raise io.InputError(f"{store}: no FOVs to reconstruct")
    for fov in fovs:
        pos = io.position(plate, fov, store)
        io.channel_index(pos.channel_names, brightfield, f"{store} FOV {fov}")
        shape = tuple(pos["0"].shape)
        if len(shape) != 5 or shape[2] < 2:
            raise io.InputError(f"{store} FOV {fov}: expected TCZYX with Z >= 2, got {shape}")


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


def progress(items, desc, total=None):
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, ascii=True, mininterval=2.0)


def common(sm):
    manifest = dict(sm.params.manifest)
    dataset = str(sm.params.dataset)
    block = dict(sm.params.settings or {})
    optics = Optics.from_manifest(manifest, where=f"dataset {dataset!r} manifest")
    device = resolve_device(sm.params.device)
    threads = torch_threads(sm)
    log.info("dataset=%s device=%s threads=%d optics=%s", dataset, device, threads, optics)
    return manifest, dataset, block, ReconstructSettings.from_config(block), optics, device


# ---------------------------------------------------------------- rules


def warmstart(sm) -> None:
    manifest, dataset, block, settings, optics, device = common(sm)
    store = str(sm.input.store)
    warm = dict(block.get("warm_start") or {})
    brightfield = str(manifest.get("brightfield", "BF"))
    with io.open_plate(store) as plate:
        fovs = io.fov_names(plate)
        check_inputs(plate, fovs, store, brightfield)
        positions, r_max = geometry(plate, fovs, manifest, block, store, need=True)
        # positions spread over the radius: evenly spaced ranks of r
        by_r = sorted(fovs, key=lambda f: math.hypot(*positions[f]))
        n = min(int(warm.get("fit_positions", 6)), len(by_r))
        chosen = [by_r[int(round(k))] for k in np.linspace(0, len(by_r) - 1, n)]
        rows = []
        for fov in progress(chosen, f"{dataset} warm-start fit"):
            where = f"{store} FOV {fov}"
            zyx = io.read_channel(plate[fov], brightfield, where, t=0)
            tf = fit_timepoint(zyx, optics, settings, device=device)
            rows.append({"fov": fov, "position_um": positions[fov], **tilt_summary([tf])})
            log.info("%s: %s", fov, rows[-1])
    fitted = RadialMap.fit(
        [r["position_um"] for r in rows],
        [r["zenith"] for r in rows],
        [r["azimuth"] for r in rows],
        [r["z_offset"] for r in rows],
        radius_um=r_max,
        power=float(warm.get("power", 2.0)),
    )
    log.info("fitted warm-start map: %s", fitted)
    io.write_text(
        json.dumps({"map": fitted.to_dict(), "positions": io.to_jsonable(rows)}, indent=1),
        sm.output.warm,
    )


def warm_map(sm, block, r_max) -> RadialMap | None:
    mode = str((block.get("warm_start") or {}).get("mode", "off"))
    if mode == "given":
        return map_from_config((block.get("warm_start") or {}).get("map") or {}, r_max)
    if mode == "fit":
        return RadialMap(**json.loads(open(sm.input.warm).read())["map"])
    return None


def shard(sm) -> None:
    manifest, dataset, block, settings, optics, device = common(sm)
    store = str(sm.input.store)
    fovs = [str(f) for f in sm.params.fovs]
    stride = int(sm.params.sample_stride)
    brightfield = str(manifest.get("brightfield", "BF"))
    log.info("settings=%s", settings)
    start = time.perf_counter()
    with io.open_plate(store) as plate:
        check_inputs(plate, fovs, store, brightfield)
        positions, r_max = geometry(
            plate, fovs, manifest, block, store, need=settings.warm_start_mode != "off"
        )
        wmap = warm_map(sm, block, r_max)
        outputs = {PHASE3D: io.create_plate(sm.output.phase, [PHASE3D])}
        if settings.phase_2d:
            outputs[PHASE2D] = io.create_plate(sm.output.phase2d, [PHASE2D])
        read_lock = threading.Lock()

        def compute(fov):
            where, p = f"{store} FOV {fov}", positions[fov]
            with read_lock:  # one reader of the input plate at a time
                pos = plate[fov]
                check_scale(pos, optics, where)
                tzyx = io.read_channel(pos, brightfield, where)
            r = math.hypot(*p) if p is not None else None
            warm = wmap(p) if wmap is not None else None
            return reconstruct_position(
                tzyx, optics, settings, warm=warm, r=r, r_max=r_max, where=where, device=device
            )

        # the thread budget: `workers` positions at a time, the job's threads shared among
        # them; this thread writes the results in FOV order
        threads = torch.get_num_threads()
        workers = max(1, min(len(fovs), threads, int(block.get("workers") or threads)))
        torch.set_num_threads(max(1, threads // workers))
        log.info("%d worker(s), %d torch thread(s) each", workers, torch.get_num_threads())
        rows = []
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = zip(fovs, bounded_map(pool, compute, fovs, workers), strict=True)
            for fov, res in progress(results, f"{dataset} reconstruct", total=len(fovs)):
                p = positions[fov]
                with read_lock:  # the workers read the same plate
                    pos = plate[fov]
                    truth, scale = simulated_truth(pos), io.scale_zyx(pos)
                geo = {
                    "position_y_um": p[0] if p else math.nan,
                    "position_x_um": p[1] if p else math.nan,
                }
                rows += [{"fov": fov, **row, **geo, **truth} for row in res.rows]
                for channel, data in ((PHASE3D, res.phase3d), (PHASE2D, res.phase2d)):
                    if channel not in outputs:
                        continue
                    vol = data if data.ndim == 4 else data[:, None]  # 2D phase: one z plane
                    sc = scale if data.ndim == 4 else (1.0, *scale[1:])
                    opos = io.write_fov(outputs[channel], fov, vol[:, None].astype(np.float32), sc)
                    fov_stats, per_t = fov_statistics(vol, stride)
                    opos.zattrs["normalization"] = io.to_jsonable(
                        {channel: {"fov_statistics": fov_stats, "timepoint_statistics": per_t}}
                    )
                summary = tilt_summary(res.fits)
                log.info(
                    "%s: zenith %.4f azimuth %.4f z_offset %.3f (truth %.4f %.4f %.3f), %d subtiles",
                    fov,
                    summary["zenith"],
                    summary["azimuth"],
                    summary["z_offset"],
                    truth["true_zenith"],
                    truth["true_azimuth"],
                    truth["true_z_offset"],
                    len(res.fits[0].origins),
                )
        for out in outputs.values():
            out.close()
    io.write_table(pd.DataFrame(rows, columns=COLUMNS), sm.output.tilt)
    log.info("%d FOVs reconstructed in %.1f s", len(fovs), time.perf_counter() - start)


def pearson(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else math.nan


def gather_store(sources, target, channel, stride) -> list[str]:
    """Copy every FOV of the shard stores (one timepoint at a time) into one plate."""
    fovs, samples = [], []
    with io.create_plate(target, [channel]) as out:
        for src_path in sources:
            with io.open_plate(src_path) as src:
                for fov in io.fov_names(src):
                    if fov in fovs:
                        raise io.InputError(f"{src_path}: FOV {fov} is in two shards")
                    pos = src[fov]
                    arr = pos["0"]
                    opos = io.create_fov(out, fov, arr.shape, io.scale_zyx(pos))
                    for t in range(arr.shape[0]):
                        data = io.read_array(arr, t, f"{src_path} FOV {fov}")
                        opos["0"][t] = data
                        samples.append(strided_sample(data, stride).ravel())
                    opos.zattrs["normalization"] = dict(pos.zattrs)["normalization"]
                    fovs.append(fov)
        out.zattrs["normalization"] = io.to_jsonable(
            {channel: {"dataset_statistics": statistics_from_sample(np.concatenate(samples))}}
        )
    return fovs


def phase_qc(phase_store, truth_store) -> pd.DataFrame:
    """Pearson of Phase3D with the simulated true phase per (FOV, t)."""
    rows = []
    with io.open_plate(phase_store) as phase, io.open_plate(truth_store) as truth:
        for fov in io.fov_names(phase):
            est = io.read_channel(phase[fov], PHASE3D, f"{phase_store} FOV {fov}")
            true = io.read_channel(truth[fov], "Phase_true", f"{truth_store} FOV {fov}")
            rows += [
                {"fov": fov, "t": t, "phase_pcc": pearson(est[t], true[t])} for t in range(len(est))
            ]
    return pd.DataFrame(rows, columns=["fov", "t", "phase_pcc"])


def gather(sm) -> None:
    stride = int(sm.params.sample_stride)
    fovs = gather_store(list(sm.input.phase), sm.output.phase, PHASE3D, stride)
    if hasattr(sm.output, "phase2d"):
        gather_store(list(sm.input.phase2d), sm.output.phase2d, PHASE2D, stride)
    tilt = pd.concat([io.read_table(p) for p in sm.input.tilt], ignore_index=True)
    tilt = tilt.sort_values(["fov", "t", "subtile"], kind="stable").reset_index(drop=True)
    io.write_table(tilt, sm.output.tilt)
    if hasattr(sm.input, "truth"):
        qc = phase_qc(sm.output.phase, sm.input.truth)
        log.info("Phase3D vs true phase: mean Pearson %.4f", float(qc["phase_pcc"].mean()))
    else:  # real data: no truth to compare with
        qc = pd.DataFrame(columns=["fov", "t", "phase_pcc"])
    io.write_table(qc, sm.output.qc)
    log.info("gathered %d FOVs from %d shards", len(fovs), len(sm.input.phase))


{"reconstruct_warmstart": warmstart, "reconstruct_shard": shard, "reconstruct": gather}[
    snakemake.rule
](snakemake)
