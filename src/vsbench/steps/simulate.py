"""simulate: write a demo dataset's raw plate (BF + fluorescence) and its ground truth."""

import time

from vsbench import io
from vsbench.simulate import TRUTH_CHANNELS, pixel_size_zyx, resolve_manifest, simulate_fovs
from vsbench.steps import setup, torch_threads

log = setup(snakemake, "simulate")  # noqa: F821
start = time.perf_counter()
dataset = str(snakemake.params.dataset)  # noqa: F821
raw_path = str(snakemake.output.raw)  # noqa: F821
truth_path = str(snakemake.output.truth)  # noqa: F821
spec = resolve_manifest(snakemake.params.manifest, dataset)  # noqa: F821
torch_threads(snakemake)  # noqa: F821
scale = pixel_size_zyx(spec["optics"])
sim = spec["simulate"]
log.info(
    "dataset %s: %s, %d FOVs, T=%d, shape %s, channels %s",
    dataset,
    sim["cell_type"],
    len(spec["fovs"]),
    sim["timepoints"],
    sim["shape"],
    spec["raw_channels"],
)

plate_attrs = io.to_jsonable(
    {"simulation": {"dataset": dataset, "simulate": sim, "optics": spec["optics"]}}
)
with (
    io.create_plate(raw_path, spec["raw_channels"]) as raw,
    io.create_plate(truth_path, TRUTH_CHANNELS) as truth,
):
    for item in simulate_fovs(spec):
        attrs = io.to_jsonable({"simulation": item["attrs"]})
        io.write_fov(raw, item["fov"], item["raw"], scale).zattrs.update(attrs)
        io.write_fov(truth, item["fov"], item["truth"], scale).zattrs.update(attrs)
        a = item["attrs"]
        log.info(
            "FOV %s: %s, %d cells, zenith %.3f, azimuth %.3f",
            item["fov"],
            a["condition"],
            a["n_cells"],
            a["zenith"],
            a["azimuth"],
        )
    raw.zattrs.update(plate_attrs)
    truth.zattrs.update(plate_attrs)
log.info("wrote %s and %s in %.1f s", raw_path, truth_path, time.perf_counter() - start)
