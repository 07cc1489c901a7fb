"""Rules features_gt, features and train_encoder.

features_gt / features: one row per (fov, t, cell) over the dataset's cell labels. Each
FOV's image is clipped to its own p1–p99 (over all timepoints) and scaled to [0, 1] before
the features are taken, so GT and predictions on different intensity scales are described
in the same units. With an extractor (input.extractor: the trained encoder or the user's
TorchScript file), the cells' crops (vsbench.encoder.cell_crops) of every FOV and
timepoint are embedded in batches → output.embeddings (id columns + e0 … e{D-1}).

train_encoder: the contrastive encoder of one target, trained on the GT crops of the
campaign's train-set datasets → a TorchScript file and its loss log.
"""

from vsbench.steps import setup

log = setup(snakemake, "features")

import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vsbench import encoder as enc  # noqa: E402
from vsbench import io  # noqa: E402
from vsbench.features import FEATURES, ID_COLUMNS, cell_features  # noqa: E402
from vsbench.segment import percentile_limits, scale_unit  # noqa: E402


def scaled_fovs(image_path, cells_path, channel, fovs):
    """(fov, scaled (T, Z, Y, X) image, labels) one FOV at a time, shapes checked."""
    with io.open_plate(image_path) as image_plate, io.open_plate(cells_path) as cell_plate:
        for fov in fovs:
            where = f"{image_path} FOV {fov}"
            image = io.read_channel(io.position(image_plate, fov, image_path), channel, where)
            cpos = io.position(cell_plate, fov, cells_path)
            labels = io.read_channel(cpos, "cells", f"{cells_path} FOV {fov}")
            if image.shape != labels.shape:
                raise io.InputError(
                    f"{where}: image shape (T, Z, Y, X) {image.shape} does not match "
                    f"cell labels {labels.shape} in {cells_path}"
                )
            limits = percentile_limits(image)
            yield fov, np.stack([scale_unit(image[t], limits) for t in range(len(image))]), labels


def train(sm) -> None:
    settings = enc.encoder_settings(sm.params.settings)
    crops = []
    for image_path, cells_path, spec in zip(
        sm.input.images, sm.input.cells, sm.params.data, strict=True
    ):
        for fov, image, labels in scaled_fovs(
            image_path, cells_path, spec["channel"], spec["fovs"]
        ):
            for t in range(len(image)):
                crops.append(enc.cell_crops(image[t], labels[t], settings["crop"])[1])
            log.info("%s %s: %d crops so far", image_path, fov, sum(len(c) for c in crops))
    crops = np.concatenate(crops) if crops else np.zeros((0, settings["crop"], settings["crop"]))
    start = time.perf_counter()
    model, losses = enc.train_encoder(crops, settings, int(sm.params.seed))
    log.info("encoder: %d crops, %d steps, loss %.4f -> %.4f (%.1f s)", len(crops), len(losses),
             losses[0], losses[-1], time.perf_counter() - start)  # fmt: skip
    import torch

    with io.atomic_path(sm.output.model) as tmp:
        torch.save(enc.encoder_checkpoint(model), tmp)
    io.write_table(pd.DataFrame({"step": range(len(losses)), "loss": losses}), sm.output.log_table)


def main(sm) -> None:
    if sm.rule == "train_encoder":
        return train(sm)
    conditions = dict(sm.params.conditions or {})
    extractor_path = getattr(sm.input, "extractor", None)
    crop_size = int((sm.params.encoder or {}).get("crop", 32)) if extractor_path else 0
    tables, crop_ids, crops = [], [], []
    for fov, image, labels in scaled_fovs(
        sm.input.image, sm.input.cells, sm.params.channel, sm.params.fovs
    ):
        start = time.perf_counter()
        for t in range(image.shape[0]):
            if crop_size:
                ids, c = enc.cell_crops(image[t], labels[t], crop_size)
                crop_ids += [(fov, t, int(i)) for i in ids]
                crops.append(c)
            df = cell_features(image[t], labels[t])
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
    if extractor_path:
        extractor = enc.load_extractor(extractor_path)
        emb = enc.embed(
            extractor, np.concatenate(crops) if crops else np.zeros((0, crop_size, crop_size))
        )
        ids = pd.DataFrame(crop_ids, columns=["fov", "t", "cell_id"])
        ids.insert(3, "condition", ids["fov"].map(lambda f: conditions.get(f, "unlabelled")))
        cols = [f"e{k}" for k in range(emb.shape[1])]
        io.write_table(
            pd.concat([ids, pd.DataFrame(emb, columns=cols)], axis=1), sm.output.embeddings
        )
        log.info("embedded %d cells (%d dims) with %s", len(ids), emb.shape[1], extractor_path)
    columns = [*ID_COLUMNS, *FEATURES]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    table = table[columns].astype({"t": "int64", "cell_id": "int64"})
    io.write_table(table, sm.output.table)
    log.info("wrote %d cells to %s", len(table), sm.output.table)


main(snakemake)
