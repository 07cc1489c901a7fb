"""Rules features_gt and features: one row per (fov, t, cell) over the dataset's cell labels.

Each FOV's image is clipped to its own p1–p99 (over all timepoints) and
scaled to [0, 1] before the features are taken, so GT and predictions on
different intensity scales are described in the same units.
"""

from vsbench.steps import setup

log = setup(snakemake, "features")

import time  # noqa: E402

import pandas as pd  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench.features import FEATURES, ID_COLUMNS, cell_features  # noqa: E402
from vsbench.segment import percentile_limits, scale_unit  # noqa: E402


def main(sm) -> None:
    conditions = dict(sm.params.conditions or {})
    image_plate = io.open_plate(sm.input.image)
    cell_plate = io.open_plate(sm.input.cells)
    tables = []
    try:
        for fov in sm.params.fovs:
            start = time.perf_counter()
            where = f"{sm.input.image} FOV {fov}"
            image = io.read_channel(
                io.position(image_plate, fov, sm.input.image), sm.params.channel, where
            )
            cpos = io.position(cell_plate, fov, sm.input.cells)
            labels = io.read_channel(cpos, "cells", f"{sm.input.cells} FOV {fov}")
            if image.shape != labels.shape:
                raise io.InputError(
                    f"{where}: image shape (T, Z, Y, X) {image.shape} does not match "
                    f"cell labels {labels.shape} in {sm.input.cells}"
                )
            limits = percentile_limits(image)
            for t in range(image.shape[0]):
                df = cell_features(scale_unit(image[t], limits), labels[t])
                df.insert(0, "condition", conditions.get(fov, "unlabelled"))
                df.insert(0, "t", t)
                df.insert(0, "fov", fov)
                tables.append(df)
            log.info(
                "%s: %d rows (%.2f s)",
                fov,
                sum(len(d) for d in tables[-image.shape[0] :]),
                time.perf_counter() - start,
            )
    finally:
        image_plate.close()
        cell_plate.close()
    columns = [*ID_COLUMNS, *FEATURES]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    table = table[columns].astype({"t": "int64", "cell_id": "int64"})
    io.write_table(table, sm.output.table)
    log.info("wrote %d cells to %s", len(table), sm.output.table)


main(snakemake)
