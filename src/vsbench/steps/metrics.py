"""Rule metrics: pixel.csv, mask.csv and feature.csv, one row per (FOV, Timepoint).

The prediction plate holds one channel, "{target}_prediction"; the GT is the
target's channel of the preprocessed plate. Definitions of every metric and
of the NaN rules (constant volume, empty masks, fewer than two cells) are in
vsbench.metrics. Feature metrics use the image-derived columns
(vsbench.features.INTENSITY_FEATURES): volume and centroids come from the
shared cell labels and are identical for GT and prediction by construction.
Loading torch-fidelity (torch + torchvision) costs a few seconds per job.

mask.csv gains the instance columns (n_gt, n_pred, AP_0.50 ... AP_0.95, mAP,
PQ, SQ, RQ) only for instance targets: params.segmentation_method ==
"instance" when the rule passes it, otherwise when any GT mask of the job has
a label > 1 (binary 0/1 masks carry no objects to match).
feature.csv: per (FOV, t) CP_FID, CP_KID(_std), CP_Median_Cosine_Similarity and
the dataset-level FID, KID, precision/recall/F1, MIND and the GT-vs-prediction
probe (repeated on every row); KID subsets = settings["kid_subsets"], and KID
and MIND draw from params.seed. None of these imports sklearn or scipy.stats
(~1 s per job).
"""

from vsbench.steps import setup

log = setup(snakemake, "metrics")

import time  # noqa: E402

import pandas as pd  # noqa: E402

from vsbench import io  # noqa: E402
from vsbench.features import INTENSITY_FEATURES  # noqa: E402
from vsbench.metrics import (  # noqa: E402
    INSTANCE_COLUMNS,
    MASK_COLUMNS,
    PIXEL_COLUMNS,
    feature_metrics,
    instance_metrics,
    mask_metrics,
    pixel_metrics,
)


def prediction_channel(plate, path) -> str:
    """The single prediction channel (or the one named *_prediction)."""
    names = list(plate.channel_names)
    if len(names) == 1:
        return names[0]
    pred = [n for n in names if n.endswith("_prediction")]
    if len(pred) != 1:
        raise io.InputError(f"{path}: expected one '*_prediction' channel, found {names}")
    return pred[0]


def read_pair(plate_a, path_a, ch_a, plate_b, path_b, ch_b, fov):
    a = io.read_channel(io.position(plate_a, fov, path_a), ch_a, f"{path_a} FOV {fov}")
    b = io.read_channel(io.position(plate_b, fov, path_b), ch_b, f"{path_b} FOV {fov}")
    if a.shape != b.shape:
        raise io.InputError(
            f"{path_b} FOV {fov}: shape (T, Z, Y, X) {b.shape} does not match {a.shape} in {path_a}"
        )
    return a, b


def main(sm) -> None:
    inp, out = sm.input, sm.output
    settings = dict(sm.params.settings or {})
    seed = int(sm.params.seed)
    kid_subsets = int(settings.get("kid_subsets", 50))
    method = getattr(sm.params, "segmentation_method", None)
    log.info("settings %s, seed %s, segmentation method %s", settings, seed, method)
    gt_plate = io.open_plate(inp.gt_image)
    pred_plate = io.open_plate(inp.prediction)
    gtm_plate = io.open_plate(inp.gt_masks)
    pm_plate = io.open_plate(inp.masks)
    pixel_rows, mask_rows, groups = [], [], []
    labelled = False  # any GT label > 1 in this job
    try:
        pred_ch = prediction_channel(pred_plate, inp.prediction)
        for fov in sm.params.fovs:
            start = time.perf_counter()
            gt, pred = read_pair(
                gt_plate, inp.gt_image, sm.params.channel, pred_plate, inp.prediction, pred_ch, fov
            )
            gtm, pm = read_pair(gtm_plate, inp.gt_masks, "mask", pm_plate, inp.masks, "mask", fov)
            if gtm.shape != gt.shape:
                raise io.InputError(
                    f"{inp.gt_masks} FOV {fov}: mask shape {gtm.shape} does not match image {gt.shape}"
                )
            for t in range(gt.shape[0]):
                groups.append((fov, t))
                pixel_rows.append({"FOV": fov, "Timepoint": t, **pixel_metrics(gt[t], pred[t])})
                row = {"FOV": fov, "Timepoint": t, **mask_metrics(gtm[t], pm[t])}
                if method in (None, "instance"):
                    row.update(instance_metrics(gtm[t], pm[t]))
                mask_rows.append(row)
            labelled = labelled or bool(gtm.max(initial=0) > 1)
            log.info("%s: pixel + mask metrics (%.2f s)", fov, time.perf_counter() - start)
    finally:
        for plate in (gt_plate, pred_plate, gtm_plate, pm_plate):
            plate.close()

    gt_feats = io.read_table(inp.gt_features)
    pred_feats = io.read_table(inp.features)
    fovs = set(sm.params.fovs)
    gt_feats = gt_feats[gt_feats["fov"].isin(fovs)]
    pred_feats = pred_feats[pred_feats["fov"].isin(fovs)]
    missing = [
        c for c in INTENSITY_FEATURES if c not in gt_feats.columns or c not in pred_feats.columns
    ]
    if missing:
        raise io.InputError(f"{inp.features}: feature columns {missing} missing")
    start = time.perf_counter()
    feats = feature_metrics(
        gt_feats, pred_feats, INTENSITY_FEATURES, groups=groups, kid_subsets=kid_subsets, seed=seed
    )
    feats = feats.rename(columns={"fov": "FOV", "t": "Timepoint"})
    first = feats.iloc[0] if len(feats) else {}
    log.info(
        "feature metrics over %d paired cells: dataset FID %.4g, KID %.4g, MIND %.4g, "
        "probe AUROC %.3g (%.2f s)",
        int(feats["n_cells"].sum()),
        *(first.get(f"Dataset_CP_{m}", float("nan")) for m in ("FID", "KID", "MIND")),
        first.get("Dataset_CP_RealVsPred_AUROC", float("nan")),
        time.perf_counter() - start,
    )

    io.write_table(pd.DataFrame(pixel_rows, columns=PIXEL_COLUMNS), out.pixel)
    instance = method == "instance" or (method is None and labelled)
    mask_columns = MASK_COLUMNS + (INSTANCE_COLUMNS if instance else [])
    io.write_table(pd.DataFrame(mask_rows, columns=mask_columns), out.mask)
    io.write_table(feats, out.feature)
    log.info("wrote %s, %s, %s", out.pixel, out.mask, out.feature)


main(snakemake)
