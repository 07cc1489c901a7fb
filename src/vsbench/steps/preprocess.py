"""preprocess: validate the raw plate, rechunk, write normalization statistics."""

import numpy as np

from vsbench import io
from vsbench.preprocess import (
    check_values,
    fov_statistics,
    statistics_from_sample,
    strided_sample,
    validate_fov,
)
from vsbench.steps import setup

log = setup(snakemake, "preprocess")  # noqa: F821
raw_path = str(snakemake.input.raw)  # noqa: F821
out_path = str(snakemake.output.store)  # noqa: F821
manifest = snakemake.params.manifest  # noqa: F821
stride = int(snakemake.params.sample_stride)  # noqa: F821

brightfield = manifest.get("brightfield", "BF")
channels = [brightfield, *manifest["channels"]]
px = manifest["optics"]["pixel_size_um"]
expected_scale = (px["z"], px["y"], px["x"])

with io.open_plate(raw_path) as raw:
    fovs = io.fov_names(raw)
    if not fovs:
        raise io.InputError(f"{raw_path}: plate has no FOVs")
    # metadata checks first: fail before writing anything
    for fov in fovs:
        pos = io.position(raw, fov, raw_path)
        scale = io.scale_zyx(pos)
        validate_fov(pos["0"], pos.channel_names, channels, scale, f"{raw_path} FOV {fov}")
        if not np.allclose(scale, expected_scale, rtol=1e-3):
            raise io.InputError(
                f"{raw_path} FOV {fov}: pixel size (z, y, x) {scale} differs from the "
                f"manifest optics {expected_scale}"
            )
    log.info("validated %d FOVs of %s", len(fovs), raw_path)

    samples = {c: [] for c in channels}
    with io.create_plate(out_path, channels) as out:
        out.zattrs.update(
            {
                "source": raw_path,
                **io.to_jsonable({k: v for k, v in dict(raw.zattrs).items() if k == "simulation"}),
            }
        )
        for fov in fovs:
            src = raw[fov]
            idx = [src.channel_names.index(c) for c in channels]
            T, _, Z, Y, X = src["0"].shape
            data = np.stack(
                [io.read_array(src["0"], np.s_[:, i], f"{raw_path} FOV {fov}") for i in idx],
                axis=1,
            ).astype(np.float32)
            for c, name in enumerate(channels):
                check_values(data[:, c], f"{raw_path} FOV {fov} channel {name}")
            chunks = (1, 1, Z, min(Y, 512), min(X, 512))
            pos = io.write_fov(out, fov, data, expected_scale, chunks=chunks)
            norm = {}
            for c, name in enumerate(channels):  # statistics from the FOV still in memory
                fov_stats, t_stats = fov_statistics(data[:, c], stride)
                norm[name] = {"fov_statistics": fov_stats, "timepoint_statistics": t_stats}
                samples[name].append(strided_sample(data[:, c], stride).ravel())
            attrs = {"normalization": norm}
            if "simulation" in src.zattrs:
                attrs["simulation"] = dict(src.zattrs["simulation"])
            pos.zattrs.update(io.to_jsonable(attrs))
            log.info("FOV %s: shape %s", fov, data.shape)
        out.zattrs["normalization"] = io.to_jsonable(
            {
                c: {"dataset_statistics": statistics_from_sample(np.concatenate(s))}
                for c, s in samples.items()
            }
        )
log.info("wrote %s", out_path)
